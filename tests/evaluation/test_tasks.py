"""Tasks: spec parsing, lm-eval's GSM8K prompts and the chat template, generative and reasoning-gym scoring on a
scripted model."""

import pytest

from recurrent_depth.data.tokenizer import apply_chat_template
from recurrent_depth.evaluation import Depth, parse_task, parse_tasks
from recurrent_depth.evaluation.tasks import MultipleChoiceTask, PerplexityTask, ReasoningGymTask, qa_prompt

from eval_data import ScriptedLM, write_jsonl


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
    fewshot = write_jsonl(tmp_path / "train.jsonl", [{"question": "Q1", "answer": "#### 1"}] * 3)
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


