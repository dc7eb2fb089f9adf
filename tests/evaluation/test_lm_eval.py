"""The lm-evaluation-harness adapter through lm-eval's simple_evaluate."""

import numpy as np
import pytest

from recurrent_depth.data.tokenizer import BOS
from recurrent_depth.decoding.generate import generate
from recurrent_depth.evaluation import Depth
from recurrent_depth.evaluation.tasks import MultipleChoiceTask, PerplexityTask

from eval_data import GEN_ROWS, write_jsonl

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

    from recurrent_depth.evaluation.lm_eval import RecurrentDepthHarnessLM

    ppl = write_jsonl(tmp_path / "ppl.jsonl", [{"text": "hello world, this is some text."},
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
