"""Evaluation: task formats, answer extraction, scoring against direct log-probabilities, padding, batch and mesh
invariance, adaptive exit, eval.py end to end, bad input, the lm-eval adapter."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers import single_cpu_env
from recurrent_depth.config import ConfigError
from recurrent_depth.evaluation import (Depth, EvalModel, Generations, GenerativeTask, MultipleChoiceTask,
                                        PerplexityTask, ReasoningGymTask, TaskFileError, exact_match,
                                        evaluate_checkpoint, extract_flexible, extract_strict, load_eval_model,
                                        parse_task, parse_tasks, sweep)
from recurrent_depth.evaluation.records import multiple_choice
from recurrent_depth.evaluation.tasks import qa_prompt, rolling_windows
from recurrent_depth.decoding import generate
from recurrent_depth.sharding import make_mesh
from recurrent_depth.tokenizer import BOS, EOS, PAD, apply_chat_template, load_tokenizer

ROOT = Path(__file__).parent.parent
TINY_CHECKPOINT = Path(__file__).parent / "fixtures" / "huginn-tiny" / "checkpoint"

GSM8K_ANSWER = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                "altogether in April and May.\n#### 72")


class CharTokenizer:
    """UTF-8 bytes as ids 4..259 (0 pad, 1 BOS, 2 EOS): a tokenizer without merges for exact expectations."""

    pad_id, bos_id, eos_id, vocab_size = 0, 1, 2, 260

    def encode(self, text):
        return [b + 4 for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(i - 4 for i in ids if i >= 4).decode("utf-8", errors="replace")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


MC_ROWS = [{"context": "The sky is", "choices": ["blue", "green", "a cat"], "gold": 0},
           {"context": "2 + 2 =", "choices": ["4", "five"], "gold": 1},
           {"context": "Paris is in", "choices": ["France", "Spain", "Peru", "Chad"], "gold": 0}]
GEN_ROWS = [{"question": "What is 2+3?", "answer": "2+3=5\n#### 5"},
            {"question": "What is 7-1?", "answer": "#### 6"},
            {"question": "What is 1+1?", "answer": "#### 2"}]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval_data")
    (path / "doc.txt").write_text("hello world, this is some text. " * 3)
    return {"mc": _write_jsonl(path / "mc.jsonl", MC_ROWS), "gen": _write_jsonl(path / "gen.jsonl", GEN_ROWS),
            "doc": path / "doc.txt", "dir": path}


@pytest.fixture(scope="module")
def lm(tiny):
    """The tiny model on one device, batch 4."""
    model, params = tiny
    return EvalModel(model, params, CharTokenizer(), mesh=make_mesh((1, 1, 1), jax.devices()[:1]), batch_size=4,
                     progress=False)


@pytest.fixture(scope="module")
def direct(tiny):
    """Summed log-probabilities of sequence tails from one plain forward pass (no padding masks: causal attention
    keeps the zeros after each sequence out of its positions)."""
    model, params = tiny
    forward = jax.jit(lambda ids, r: model.apply({"params": params}, ids, num_steps=r, init_scale=0.0).logits)

    def logprobs(sequences, starts, num_steps):
        ids = np.zeros((len(sequences), model.config.max_seq_len), np.int32)
        for i, seq in enumerate(sequences):
            ids[i, :len(seq)] = seq
        logits = np.asarray(forward(ids, num_steps), np.float64)
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        return [sum(logp[i, t - 1, seq[t]] for t in range(start, len(seq)))
                for i, (seq, start) in enumerate(zip(sequences, starts))]

    return logprobs


# ---- answers and formats -----------------------------------------------------------------------------------
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
        (question,) = multiple_choice(_write_jsonl(tmp_path / f"{name}.jsonl", [row]))  # format detected
        assert (list(question.contexts), list(question.continuations), question.gold) == expected[name], name
        assert question.lengths == tuple(len(c) - 1 for c in expected[name][1])  # acc_norm: characters of choices
    # The original OBQA layout needs the format named (its fields look like ARC's).
    original = {"question": {"stem": "The sun is", "choices": [{"text": "hot", "label": "A"},
                                                               {"text": "cold", "label": "B"}]}, "answerKey": "B"}
    (question,) = multiple_choice(_write_jsonl(tmp_path / "obqa.jsonl", [original]), "openbookqa")
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


def test_task_specs(files, tmp_path):
    pytest.importorskip("reasoning_gym")
    mc, gen, doc = (str(files[k]) for k in ("mc", "gen", "doc"))
    tasks = parse_tasks([f"mc:{mc}", f"gen:{gen}:k=1:max_new_tokens=16:name=gsm", f"ppl:{doc}",
                         "rg:basic_arithmetic:size=3:seed=5:max_terms=2"],
                        defaults={"chat": True, "system": "Be brief."})
    assert [t.name for t in tasks] == ["mc:mc", "gsm", "ppl:doc", "rg:basic_arithmetic"]
    assert isinstance(tasks[0], MultipleChoiceTask) and isinstance(tasks[2], PerplexityTask)
    gsm, rg = tasks[1], tasks[3]
    assert (gsm.k, gsm.max_new_tokens, gsm.chat, gsm.system, len(gsm.items)) == (1, 16, True, "Be brief.", 2)
    assert gsm.shots == [("What is 2+3?", "2+3=5\n#### 5")]  # without fewshot=, the first k records, not scored
    assert isinstance(rg, ReasoningGymTask) and rg.config == {"max_terms": 2} and rg.chat
    again = parse_task("rg:basic_arithmetic:size=3:seed=5:max_terms=2")
    assert [e["question"] for e in again.entries] == [e["question"] for e in rg.entries]  # fixed seed and size
    other = parse_task("rg:basic_arithmetic:size=3:seed=6:max_terms=2")
    assert [e["question"] for e in other.entries] != [e["question"] for e in rg.entries]
    fewshot = _write_jsonl(tmp_path / "train.jsonl", [{"question": "Q1", "answer": "#### 1"}] * 3)
    gsm = parse_task(f"generative:{gen}:k=2:fewshot={fewshot}:limit=2")
    assert len(gsm.shots) == 2 and len(gsm.items) == 2


def test_prompts_follow_lm_eval_gsm8k_and_the_chat_template():
    shots = [("What is 1+1?", "1+1=2\n#### 2")]
    assert qa_prompt("What is 2+2?", shots, chat=False, system=None) == (
        "Question: What is 1+1?\nAnswer: 1+1=2\n#### 2\n\nQuestion: What is 2+2?\nAnswer:")
    assert qa_prompt("Q?", [], chat=False, system="Be brief.") == "Be brief.\n\nQuestion: Q?\nAnswer:"
    assert qa_prompt("What is 2+2?", shots, chat=True, system="Be brief.") == apply_chat_template([
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Question: What is 1+1?\nAnswer:"},
        {"role": "assistant", "content": "1+1=2\n#### 2"},
        {"role": "user", "content": "Question: What is 2+2?\nAnswer:"}])


class ScriptedLM:
    """Stands in for EvalModel in generative tasks: answers each prompt with `respond(prompt text)`."""

    def __init__(self, respond):
        self.tokenizer, self.respond, self.prompts = CharTokenizer(), respond, []

    def encode(self, text):
        return [self.tokenizer.bos_id] + self.tokenizer.encode(text)

    def stop_ids(self):
        return [self.tokenizer.eos_id]

    def generate(self, prompts, depth, max_new_tokens, stop_ids, desc=""):
        texts = [self.tokenizer.decode(p) for p in prompts]
        self.prompts += texts
        tokens = [self.tokenizer.encode(self.respond(t)) for t in texts]
        counts = np.asarray([len(t) + 1 for t in tokens])
        return Generations(tokens, counts * 3, counts)


def test_generative_and_reasoning_gym_scoring(files):
    pytest.importorskip("reasoning_gym")
    responses = {"What is 7-1?": "7-1 = 6\n#### 6",  # strict and flexible
                 "What is 1+1?": "It is 2.\n\nQuestion: What is 3+3?\nAnswer: 6"}  # flexible only (cut at Question:)
    lm = ScriptedLM(lambda prompt: next(v for k, v in responses.items() if prompt.endswith(f"{k}\nAnswer:")))
    task = parse_task(f"gen:{files['gen']}:k=1")
    result = task.evaluate(lm, Depth(3, "kl", 1e-3))
    assert result.metrics == {"exact_match_strict": 0.5, "exact_match_flexible": 1.0, "mean_steps": 3.0}
    assert [s["response"] for s in result.samples] == ["7-1 = 6\n#### 6", "It is 2.\n\n"]
    assert lm.prompts[0] == "Question: What is 2+3?\nAnswer: 2+3=5\n#### 5\n\nQuestion: What is 7-1?\nAnswer:"

    rg = parse_task("rg:basic_arithmetic:size=4:seed=1")
    right = {e["question"]: str(e["answer"]) for e in rg.entries[:3]}
    lm = ScriptedLM(lambda p: next((f" {a}\nmore text" for q, a in right.items() if q in p), " 12345"))
    result = rg.evaluate(lm, Depth(2))
    assert result.metrics == {"score": 0.75} and [s["score"] for s in result.samples] == [1.0, 1.0, 1.0, 0.0]


# ---- scoring with the model --------------------------------------------------------------------------------
def test_multiple_choice_equals_direct_log_probabilities(lm, direct, files):
    task = MultipleChoiceTask("mc", files["mc"])
    result = task.evaluate(lm, Depth(4))
    tok = CharTokenizer()
    sequences, starts = [], []
    for row in MC_ROWS:
        context = [tok.bos_id] + tok.encode(row["context"])
        sequences += [context + tok.encode(" " + c) for c in row["choices"]]
        starts += [len(context)] * len(row["choices"])
    flat = direct(sequences, starts, 4)
    correct = correct_norm = 0
    for row, sample in zip(MC_ROWS, result.samples):
        lls, flat = flat[:len(row["choices"])], flat[len(row["choices"]):]
        np.testing.assert_allclose(sample["loglikelihoods"], lls, rtol=2e-5)
        correct += int(np.argmax(lls)) == row["gold"]
        correct_norm += int(np.argmax(np.asarray(lls) / [len(c) for c in row["choices"]])) == row["gold"]
    assert result.metrics == {"acc": correct / 3, "acc_norm": correct_norm / 3}

    ppl = PerplexityTask("ppl", files["doc"]).evaluate(lm, Depth(4))
    text = files["doc"].read_text()
    ids = [tok.bos_id] + tok.encode(text)  # 97 tokens: one window
    (nll,) = -np.asarray(direct([ids], [1], 4))
    np.testing.assert_allclose([ppl.metrics["loss"], ppl.metrics["bits_per_byte"]],
                               [nll / (len(ids) - 1), nll / len(text.encode()) / np.log(2)], rtol=2e-5)


def _requests(n=11, seed=0):
    """Random (context, continuation) ids, at most 27 inputs: padded to 16 or 32 positions."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(4, 260, rng.integers(1, 21)).tolist(), rng.integers(4, 260, rng.integers(1, 9)).tolist())
            for _ in range(n)]


def test_scores_do_not_depend_on_batch_size_padding_or_order(lm, tiny):
    model, params = tiny
    requests = _requests()

    def check(lm, reference=None):
        together = lm.loglikelihood(requests, Depth(3))  # batches of mixed lengths, padded to the longest
        alone = np.concatenate([lm.loglikelihood([r], Depth(3)).logprob for r in requests])  # own bucket
        backwards = lm.loglikelihood(requests[::-1], Depth(3)).logprob[::-1]
        for other in [alone, backwards] + ([] if reference is None else [reference]):
            np.testing.assert_allclose(other, together.logprob, rtol=2e-5)
        return together.logprob

    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    reference = check(lm)
    check(EvalModel(model, params, CharTokenizer(), mesh=mesh, batch_size=1, progress=False), reference)
    # A random initial state drawn per position and request (keyed by its tokens) from the seed is as invariant.
    seeded = EvalModel(model, params, CharTokenizer(), mesh=mesh, batch_size=4, init_scale=1.0, seed=7,
                       progress=False)
    noisy = check(seeded)
    seeded.seed = 8
    assert not np.allclose(noisy, reference) and not np.allclose(lm.loglikelihood(requests, Depth(3)).logprob,
                                                                 seeded.loglikelihood(requests, Depth(3)).logprob)


def test_sharded_evaluation_equals_single_device(lm, tiny, files):
    model, params = tiny
    sharded = EvalModel(model, params, CharTokenizer(), mesh=make_mesh((2, 2, 2), jax.devices()), batch_size=4,
                        progress=False)
    tasks = [MultipleChoiceTask("mc", files["mc"]), PerplexityTask("ppl", files["doc"])]
    entries, samples = sweep(sharded, tasks, [Depth(1)])
    compilations = sharded.compilations
    more, more_samples = sweep(sharded, tasks, [Depth(5)])
    assert sharded.compilations == compilations  # the sweep reuses the compiled scoring function
    reference, reference_samples = sweep(lm, tasks, [Depth(1), Depth(5)])
    for got, want in zip(entries + more, reference):
        for name in ("mc", "ppl"):
            for metric, value in want["tasks"][name].items():
                if metric != "seconds":
                    np.testing.assert_allclose(got["tasks"][name][metric], value, rtol=1e-5)
    for key, rows in reference_samples.items():
        got = (samples | more_samples)[key]
        for a, b in zip(got, rows):
            np.testing.assert_allclose(a.get("loglikelihoods", a.get("nll")), b.get("loglikelihoods", b.get("nll")),
                                       rtol=1e-5)
    gen = GenerativeTask("gen", files["gen"], max_new_tokens=6)
    assert ([s["response"] for s in gen.evaluate(sharded, Depth(2)).samples] ==
            [s["response"] for s in gen.evaluate(lm, Depth(2)).samples])


def test_adaptive_exit_extremes_equal_fixed_depths(lm):
    requests = [(c[:8], x[:4]) for c, x in _requests(n=5, seed=1)]  # every prefix in one length bucket
    never = lm.loglikelihood(requests, Depth(3, "kl", 0.0))  # KL never drops below 0: all 3 iterations
    np.testing.assert_allclose(never.logprob, lm.loglikelihood(requests, Depth(3)).logprob, rtol=2e-5)
    np.testing.assert_array_equal(never.steps, 3.0)
    first = lm.loglikelihood(requests, Depth(3, "kl", 1e9))  # exits at the first check, after one iteration
    np.testing.assert_allclose(first.logprob, lm.loglikelihood(requests, Depth(1)).logprob, rtol=2e-5)
    np.testing.assert_array_equal(first.steps, 1.0)


def test_a_sweep_compiles_generation_once(lm):
    from recurrent_depth.decoding import _generate_jit

    prompts = [[5, 6, 7], [8, 9]]
    lm.max_steps = 4  # what sweep() sets: its largest count
    before = _generate_jit._cache_size()
    outs = [lm.generate(prompts, Depth(r), max_new_tokens=3, stop_ids=[]) for r in (1, 2, 4)]
    assert _generate_jit._cache_size() == before + 1
    direct = generate(lm.model, lm.params, prompts, max_new_tokens=3, num_steps=2, init_scale=0.0)
    assert outs[1].tokens == [row[:3] for row in np.asarray(direct.tokens).tolist()]  # same result as its own count


# ---- eval.py ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """The tiny checkpoint with a byte-level BPE tokenizer.json (vocab 300, huginn-0125's special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = tmp_path_factory.mktemp("hf") / "checkpoint"
    shutil.copytree(TINY_CHECKPOINT, path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, "<|begin_header|>", "<|end_header|>", "<|end_turn|>", PAD]
    text = [json.dumps(MC_ROWS + GEN_ROWS), "Question: Answer: Calculate 12 + 7 * 3 - 4."] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path / "tokenizer.json"))
    return path


def test_eval_py_end_to_end(hf_checkpoint, files, tmp_path, direct):
    pytest.importorskip("reasoning_gym")
    out, doc = tmp_path / "out", tmp_path / "short.txt"
    doc.write_text("hello world.")
    # Shapes chosen for few compilations: scoring prompts fit 16 positions, generation prompts 64.
    tasks = (f"mc:{files['mc']},gen:{files['gen']}:k=1:max_new_tokens=8,ppl:{doc},"
             "rg:basic_arithmetic:size=3:max_new_tokens=8")
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), f"--checkpoint={hf_checkpoint}", f"--tasks={tasks}",
                           "--num_steps=1,2", "--exit_criterion=kl", "--exit_threshold=1e-2", "--batch_size=4",
                           f"--output={out}"], capture_output=True, text=True, env=single_cpu_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [e["setting"] for e in results["results"]] == ["r=1", "r=2", "kl=0.01, max 2"]
    names = ["mc:mc", "gen:gen", "ppl:short", "rg:basic_arithmetic"]
    for entry in results["results"]:
        assert list(entry["tasks"]) == names
        assert ("mean_steps" in entry["tasks"]["mc:mc"]) == (entry["exit_criterion"] is not None)
    # The multiple-choice scores at r=1, recomputed here from one plain forward pass with the checkpoint's tokenizer
    # (lm-eval's split: the continuation is what the whole string's encoding adds to the context's).
    tok = load_tokenizer("huggingface", hf_checkpoint)
    encode = lambda text: [tok.bos_id] + [i for i in tok.encode(text) if i != tok.bos_id]  # noqa: E731
    samples = [json.loads(line) for line in (out / "samples" / "mc_mc" / "r_1.jsonl").read_text().splitlines()]
    correct = 0
    for row, sample in zip(MC_ROWS, samples, strict=True):
        contexts = [encode(row["context"])] * len(row["choices"])
        lls = direct([encode(row["context"] + " " + c) for c in row["choices"]], [len(c) for c in contexts], 1)
        np.testing.assert_allclose(sample["loglikelihoods"], lls, rtol=2e-5)
        correct += int(np.argmax(lls)) == row["gold"]
    assert results["results"][0]["tasks"]["mc:mc"]["acc"] == correct / len(MC_ROWS)
    assert 1 <= results["results"][2]["tasks"]["gen:gen"]["mean_steps"] <= 2
    assert results["tasks"]["rg:basic_arithmetic"]["size"] == 3 and results["mesh"] == {"data": 1, "fsdp": 1,
                                                                                          "tensor": 1}
    assert len(results["plots"]) == 8  # acc, acc_norm, 2 exact matches, loss, perplexity, bits/byte, score
    for plot in results["plots"]:
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "samples" / "gen_gen" / "r_2.jsonl").read_text().splitlines()) == 2
    assert "exact_match_flexible" in proc.stdout and "kl=0.01, max 2" in proc.stdout


# ---- bad input ----------------------------------------------------------------------------------------------
def test_bad_input_gives_clear_errors(tmp_path, files, tiny, hf_checkpoint):
    with pytest.raises(FileNotFoundError, match="task file .*missing.jsonl does not exist"):
        parse_task(f"mc:{tmp_path / 'missing.jsonl'}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(MC_ROWS[0]) + "\n\n" + '{"context": "a", "choices": [\n')
    with pytest.raises(TaskFileError, match=r"bad.jsonl:3: malformed JSON"):
        parse_task(f"mc:{bad}")
    _write_jsonl(bad, [MC_ROWS[0], {"context": "a", "gold": 0}])
    with pytest.raises(TaskFileError, match=r"bad.jsonl:2: not a generic record \(missing field 'choices'\)"):
        parse_task(f"mc:{bad}")
    _write_jsonl(bad, [{"context": "a", "choices": ["x", "y"], "gold": 2}])
    with pytest.raises(TaskFileError, match=r"bad.jsonl:1: .*gold index in range"):
        parse_task(f"mc:{bad}")
    _write_jsonl(bad, [{"prompt": "a"}])
    with pytest.raises(TaskFileError, match=r"bad.jsonl:1: expected a string 'question'"):
        parse_task(f"gen:{bad}")
    with pytest.raises(TaskFileError, match="cannot tell the multiple-choice format"):
        parse_task(f"mc:{bad}")
    with pytest.raises(ValueError, match="KIND:TARGET"):
        parse_task(f"quiz:{files['mc']}")
    with pytest.raises(ValueError, match="unknown option 'shots'"):
        parse_task(f"gen:{files['gen']}:shots=3")
    with pytest.raises(ValueError, match="option k: expected int, got 'three'"):
        parse_task(f"gen:{files['gen']}:k=three")
    if importlib.util.find_spec("reasoning_gym"):
        with pytest.raises(ValueError, match="cannot build 'no_such_dataset'"):
            parse_task("rg:no_such_dataset")
    with pytest.raises(ValueError, match="unique"):
        parse_tasks([f"mc:{files['mc']}", f"mc:{files['mc']}"])
    # A config that does not describe the checkpoint; the matching one passes (and then wants a tokenizer).
    config = tmp_path / "wide.py"
    config.write_text(f"import sys\nsys.path.insert(0, {str(ROOT / 'configs')!r})\nimport tiny\n\n"
                      "def get_config():\n    c = tiny.get_config()\n    c.model.hidden_size = 128\n"
                      "    c.model.num_heads = 8\n    return c\n")
    with pytest.raises(ConfigError, match=r"(?s)does not match --config=.*hidden_size: checkpoint 64 != config 128"):
        load_eval_model(hf_checkpoint, config=str(config))
    load_eval_model(hf_checkpoint, config=str(ROOT / "configs" / "tiny.py"), mesh="8,1,1", progress=False)
    with pytest.raises(FileNotFoundError, match="pass --tokenizer"):
        load_eval_model(TINY_CHECKPOINT)
    with pytest.raises(ValueError, match="no tasks to evaluate: pass --tasks .* is not a train.py workdir"):
        evaluate_checkpoint(TINY_CHECKPOINT)
    with pytest.raises(FileNotFoundError, match="checkpoint .*nowhere does not exist"):
        evaluate_checkpoint(tmp_path / "nowhere", ["shell:1-2"])
    model, params = tiny
    big = type("Big", (CharTokenizer,), {"vocab_size": 1000})()
    with pytest.raises(ValueError, match="tokenizer has 1000 tokens but the model only 512"):
        EvalModel(model, params, big)
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), f"--checkpoint={TINY_CHECKPOINT}",
                           f"--tasks=mc:{tmp_path / 'nope.jsonl'}"], capture_output=True, text=True, env=single_cpu_env(),
                          timeout=300)
    assert proc.returncode == 1 and "eval.py: error: task file" in proc.stderr and "Traceback" not in proc.stderr


# ---- lm-eval ------------------------------------------------------------------------------------------------
LM_EVAL_TASKS = """
task: tiny_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {mc}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: gold
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
---
task: tiny_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: {gen}}}}}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["Question:"], max_gen_toks: 6, do_sample: false}}
metric_list: [{{metric: exact_match}}]
---
task: tiny_ppl
dataset_path: json
dataset_kwargs: {{data_files: {{test: {ppl}}}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list: [{{metric: word_perplexity}}, {{metric: bits_per_byte}}]
"""


def test_lm_eval_adapter_simple_evaluate(hf_checkpoint, files, tmp_path, monkeypatch):
    for name, value in (("HF_DATASETS_CACHE", str(tmp_path / "hf_cache")), ("HF_DATASETS_OFFLINE", "1"),
                        ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from recurrent_depth.lm_eval_adapter import RecurrentDepthHarnessLM

    ppl = _write_jsonl(tmp_path / "ppl.jsonl", [{"text": "hello world, this is some text."},
                                                {"text": "Question: What is 2+3?"}])
    for i, spec in enumerate(LM_EVAL_TASKS.split("---")):
        (tmp_path / f"task_{i}.yaml").write_text(spec.format(mc=files["mc"], gen=files["gen"], ppl=ppl))
    assert get_model("recurrent_depth") is RecurrentDepthHarnessLM
    model = RecurrentDepthHarnessLM.create_from_arg_string(f"checkpoint={hf_checkpoint},num_steps=2,mesh=1x-1x1",
                                                           {"batch_size": 4, "device": None})
    out = lm_eval.simple_evaluate(model=model, tasks=["tiny_mc", "tiny_gen", "tiny_ppl"],
                                  task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                                  bootstrap_iters=0, log_samples=True)
    results = out["results"]
    # The harness's requests are the ones our own tasks build, so the numbers agree.
    mc = MultipleChoiceTask("mc", files["mc"]).evaluate(model.lm, Depth(2)).metrics
    assert (results["tiny_mc"]["acc,none"], results["tiny_mc"]["acc_norm,none"]) == (mc["acc"], mc["acc_norm"])
    own = PerplexityTask("ppl", ppl).evaluate(model.lm, Depth(2)).metrics
    np.testing.assert_allclose(results["tiny_ppl"]["bits_per_byte,none"], own["bits_per_byte"], rtol=1e-5)
    # The harness's generations are greedy decoding at 2 iterations, cut at its stop string; exact match follows.
    prompts = [f"Question: {row['question']}\nAnswer:" for row in GEN_ROWS]
    direct = generate(model.lm.model, model.lm.params, [model.lm.encode(p) for p in prompts], max_new_tokens=6,
                      num_steps=2, init_scale=0.0, stop_tokens=model.lm.stop_ids())
    vocab = model.lm.tokenizer.vocab_size
    expected = [model.lm.tokenizer.decode([t for t in row if 0 <= t < vocab]).split("Question:")[0]
                for row in np.asarray(direct.tokens).tolist()]
    harness = sorted(out["samples"]["tiny_gen"], key=lambda sample: sample["doc_id"])
    assert [sample["resps"][0][0] for sample in harness] == expected
    matches = [text == row["answer"] for text, row in zip(expected, GEN_ROWS)]
    assert results["tiny_gen"]["exact_match,none"] == np.mean(matches)
    assert model.mean_steps and all(s == 2 for s in model.mean_steps)
    chat = model.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert chat.startswith(BOS) and chat.endswith("<|begin_header|>Huginn<|end_header|>\n\n")
