"""eval.py end to end on a Hugging Face checkpoint, and bad input as clear errors."""

import importlib.util
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from recurrent_depth.data.tokenizer import load_tokenizer
from recurrent_depth.errors import ConfigError, TaskFileError
from recurrent_depth.evaluation import (
    EvalModel,
    evaluate_checkpoint,
    load_eval_model,
    parse_task,
    parse_tasks,
)

from eval_data import MC_ROWS, ROOT, TINY_CHECKPOINT, CharTokenizer, write_jsonl
from helpers import single_cpu_env


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


def test_eval_py_loads_a_checkpoint_in_its_config_dtype(hf_checkpoint, tmp_path):
    """A Hugging Face checkpoint whose config.json says bfloat16 (as huginn-0125's) is evaluated in bfloat16 unless
    --dtype says otherwise."""
    checkpoint = shutil.copytree(hf_checkpoint, tmp_path / "bf16")
    hf = json.loads((checkpoint / "config.json").read_text())
    hf.pop("dtype", None)
    (checkpoint / "config.json").write_text(json.dumps({**hf, "torch_dtype": "bfloat16"}))
    spec = importlib.util.spec_from_file_location("eval_py", ROOT / "eval.py")
    eval_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_py)
    (tmp_path / "doc.txt").write_text("hello world.")
    for flags, dtype in (([], "bfloat16"), (["--dtype=float32"], "float32")):
        assert eval_py.main([f"--checkpoint={checkpoint}", f"--tasks=ppl:{tmp_path / 'doc.txt'}", "--num_steps=1",
                             "--exit_criterion=none", f"--output={tmp_path / dtype}", *flags]) == 0
        model_config = json.loads((tmp_path / dtype / "results.json").read_text())["model_config"]
        assert model_config["dtype"] == model_config["param_dtype"] == dtype


# ---- bad input ----------------------------------------------------------------------------------------------
def test_bad_input_gives_clear_errors(tmp_path, files, tiny, hf_checkpoint):
    with pytest.raises(FileNotFoundError, match="task file .*missing.jsonl does not exist"):
        parse_task(f"mc:{tmp_path / 'missing.jsonl'}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(MC_ROWS[0]) + "\n\n" + '{"context": "a", "choices": [\n')
    with pytest.raises(TaskFileError, match=r"bad.jsonl:3: malformed JSON"):
        parse_task(f"mc:{bad}")
    write_jsonl(bad, [MC_ROWS[0], {"context": "a", "gold": 0}])
    with pytest.raises(TaskFileError, match=r"bad.jsonl:2: not a generic record \(missing field 'choices'\)"):
        parse_task(f"mc:{bad}")
    write_jsonl(bad, [{"context": "a", "choices": ["x", "y"], "gold": 2}])
    with pytest.raises(TaskFileError, match=r"bad.jsonl:1: .*gold index in range"):
        parse_task(f"mc:{bad}")
    write_jsonl(bad, [{"prompt": "a"}])
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
                           f"--tasks=mc:{tmp_path / 'nope.jsonl'}"], capture_output=True, text=True,
                          env=single_cpu_env(), timeout=300)
    assert proc.returncode == 1 and "eval.py: error: task file" in proc.stderr and "Traceback" not in proc.stderr


