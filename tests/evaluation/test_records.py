"""Task files and answers: GSM8K answer extraction, the multiple-choice benchmark formats as lm-eval builds
them, rolling perplexity windows."""


from recurrent_depth.evaluation.answers import exact_match, extract_flexible, extract_strict
from recurrent_depth.evaluation.records import multiple_choice
from recurrent_depth.evaluation.tasks import rolling_windows

from eval_data import GSM8K_ANSWER, write_jsonl


def test_strict_and_flexible_extraction_on_gsm8k_answers():
    assert extract_strict(GSM8K_ANSWER) == "72" and extract_flexible(GSM8K_ANSWER) == "72"
    assert exact_match("72", GSM8K_ANSWER) and not exact_match("24", GSM8K_ANSWER)
    response = "Weng earns 12/60 = $0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $10.\n#### 10"
    assert (extract_strict(response), extract_flexible(response)) == ("10", "10")
    # No marker: strict fails, flexible takes the last number; "$1,080." normalises to 1080.
    response = "Betty has 100 / 2 = 50 dollars, so she pays $1,080."
    assert extract_strict(response) == "[invalid]" and extract_flexible(response) == "$1,080."
    assert exact_match(extract_flexible(response), "She needs 1,080 in total.\n#### 1,080")
    assert not exact_match(extract_strict(response), "#### 1,080")
    # The strict answer is the first marker; the flexible one the last number, even a later one.
    response = "#### -3.5\n\nQuestion: Tom has 4 apples"
    assert (extract_strict(response), extract_flexible(response)) == ("-3.5", "4")
    assert exact_match(extract_strict(response), "#### -3.5")
    assert extract_flexible("x = 7 and y = 12.") == "12." and exact_match("12.", "#### 12")
    assert extract_strict("no numbers here") == extract_flexible("no numbers here") == "[invalid]"
    assert not exact_match("[invalid]", "#### 5")


def test_benchmark_formats_become_lm_eval_requests(tmp_path):
    rows = {
        "arc": {"id": "x", "question": "Which is a gas?", "choices": {"text": ["ice", "steam"], "label": ["A", "B"]},
                "answerKey": "B"},
        "hellaswag": {"activity_label": "Baking", "ctx_a": "She mixes flour.", "ctx_b": "then she",
                      "endings": ["bakes it [title] well.", "sings."], "label": "0"},
        "piqa": {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0},
        "sciq": {"question": "What do plants need?", "distractor1": "salt", "distractor2": "sand",
                 "distractor3": "oil", "correct_answer": "light", "support": " Plants use light."},
        "openbookqa": {"id": "7", "question_stem": "The sun is", "choices": {"text": ["hot", "cold"],
                                                                             "label": ["A", "B"]},
                       "answerKey": "A"},
        "winogrande": {"sentence": "The cup fell off the table because _ was slippery.", "option1": "the cup",
                       "option2": "the table", "answer": "2"},
        "mmlu": {"question": "2+2?", "subject": "math", "choices": ["3", "4"], "answer": 1},
    }
    expected = {
        "arc": (["Question: Which is a gas?\nAnswer:"] * 2, [" ice", " steam"], 1),
        "hellaswag": (["Baking: She mixes flour. Then she"] * 2, [" bakes it. well.", " sings."], 0),
        "piqa": (["Question: Open a jar\nAnswer:"] * 2, [" Twist the lid.", " Eat the lid."], 0),
        "sciq": (["Plants use light.\nQuestion: What do plants need?\nAnswer:"] * 4,
                 [" salt", " sand", " oil", " light"], 3),
        "openbookqa": (["The sun is"] * 2, [" hot", " cold"], 0),
        "winogrande": (["The cup fell off the table because the cup", "The cup fell off the table because the table"],
                       [" was slippery."] * 2, 1),
        "mmlu": (["2+2?\nA. 3\nB. 4\nAnswer:"] * 2, [" A", " B"], 1),
    }
    for name, row in rows.items():
        (question,) = multiple_choice(write_jsonl(tmp_path / f"{name}.jsonl", [row]))  # format detected
        assert (list(question.contexts), list(question.continuations), question.gold) == expected[name], name
        assert question.lengths == tuple(len(c) - 1 for c in expected[name][1])  # acc_norm: characters of choices
    # The original OBQA layout needs the format named (its fields look like ARC's).
    original = {"question": {"stem": "The sun is", "choices": [{"text": "hot", "label": "A"},
                                                               {"text": "cold", "label": "B"}]}, "answerKey": "B"}
    (question,) = multiple_choice(write_jsonl(tmp_path / "obqa.jsonl", [original]), "openbookqa")
    assert question.contexts == ("The sun is",) * 2 and question.gold == 1


def test_rolling_windows_predict_every_token_once_with_the_most_context():
    tokens = list(range(10, 33))  # 23 tokens, window 8
    pairs = rolling_windows(tokens, prefix=1, window=8)
    assert [x for _, x in pairs] == [tokens[0:8], tokens[8:16], tokens[16:23]]
    assert pairs[0][0] == [1] and pairs[1][0] == [tokens[7]]  # BOS, then the previous token
    assert all(len(c) + len(x) - 1 <= 8 for c, x in pairs)
    assert len(pairs[-1][0]) + len(pairs[-1][1]) - 1 == 8  # the last window gets a full context
    for context, continuation in pairs:
        whole = [1] + tokens
        start = whole.index(continuation[0])
        assert whole[start - len(context):start] == context


