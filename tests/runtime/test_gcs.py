"""Cloud-storage workdirs against a real GCS API: fake-gcs-server on localhost, reached by gcsfs (through
STORAGE_EMULATOR_HOST) and by tensorstore, Orbax's array storage (through TENSORSTORE_GCS_HTTP_URL)."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from etils import epath

from recurrent_depth.checkpoint.loading import load_model
from recurrent_depth.checkpoint.params import load_params, save_params
from recurrent_depth.cli.convert import main as convert_main
from recurrent_depth.data.tokenizer import BOS, EOS, PAD, load_tokenizer, train_sentencepiece
from recurrent_depth.runtime.paths import as_path, is_url
from recurrent_depth.training.telemetry import read_metrics

from helpers import TINY, single_cpu_env

ROOT = Path(__file__).parents[2]  # the repository: train.py, eval.py, configs/
STEPS, EVERY = 40, 10
# The demo config, shrunk: a step slow enough (~0.1 s) that the kill lands between a checkpoint and the end.
RUN_FLAGS = [f"--config.train.steps={STEPS}", "--config.train.batch_size=16", "--config.train.log_every=1",
             "--config.model.mean_recurrence=16", f"--config.checkpoint.every={EVERY}", "--config.eval.every=0",
             "--config.train.peak_flops=1e12", "--config.train.optimizer.warmup_steps=2"]


def test_gs_paths_keep_the_url_and_parameters_round_trip(bucket, tiny):
    path = as_path("gs://b/x") / "y"
    assert str(path) == "gs://b/x/y" and is_url(path)
    assert as_path("x") == epath.Path(os.getcwd()) / "x" and not is_url("x")
    model, params = tiny
    save_params("gs://bkt/params", model.config, params)
    assert (bucket / "params" / "model_config.json").exists()
    loaded_model, loaded = load_params("gs://bkt/params")
    assert loaded_model.config == model.config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert convert_main(["to-params", str(TINY / "checkpoint"), "gs://bkt/converted"]) == 0  # HF -> the bucket
    _, converted = load_model("gs://bkt/converted")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(converted), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileNotFoundError, match="no model_config.json in gs://bkt/nothing"):
        load_params("gs://bkt/nothing")
    with pytest.raises(FileNotFoundError, match="bucket gs://nobucket of gs://nobucket/params does not exist"):
        save_params("gs://nobucket/params", model.config, params)


def test_tokenizers_train_and_load_through_gs(bucket):
    from tokenizers import Tokenizer, models, pre_tokenizers

    text = "the core block iterates über 12 latent steps\n" * 200
    (bucket / "tok" / "corpus.txt").write_text(text)
    sp = train_sentencepiece(["gs://bkt/tok/corpus.txt"], "gs://bkt/tok/sp", vocab_size=300)
    assert (bucket / "tok" / "sp.model").exists() and sp.decode(sp.encode(text)) == text
    again = pickle.loads(pickle.dumps(sp))  # as grain workers get it: rebuilt from the bucket
    assert again.encode(text) == sp.encode(text)

    vocab = {BOS: 0, EOS: 1, PAD: 2, "[UNK]": 3, "core": 4, "block": 5}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    (bucket / "hf" / "tokenizer.json").write_text(hf.to_str())
    loaded = load_tokenizer("huggingface", "gs://bkt/hf")
    assert loaded.encode("core block x") == [4, 5, 3] and (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (0, 1, 2)
    with pytest.raises(FileNotFoundError, match="gs://bkt/nothing/tokenizer.json does not exist"):
        load_tokenizer("huggingface", "gs://bkt/nothing/tokenizer.json")


def _start(script, flags, cwd, log):
    """A subprocess as a user runs it; compilations are cached (outside cwd) from one run to the next."""
    env = dict(single_cpu_env(), JAX_COMPILATION_CACHE_DIR=str(log.parent / "jax-cache"))
    return subprocess.Popen([sys.executable, str(ROOT / script), *flags], cwd=cwd, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def _committed_steps(checkpoints: epath.Path) -> list[int]:
    """Steps whose checkpoint Orbax has committed (on GCS it marks them with commit_success.txt)."""
    if not checkpoints.exists():
        return []
    return sorted(int(p.name) for p in checkpoints.iterdir()
                  if p.name.isdigit() and (p / "commit_success.txt").exists())


def _losses(run: epath.Path) -> list[tuple[int, float]]:
    """(step, loss) of each training record of the run, in step order."""
    return [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]


@pytest.mark.slow
def test_train_killed_resumed_and_evaluated_in_a_bucket(bucket, tmp_path):
    """train.py --workdir=gs://bkt/run writes only to the bucket, is SIGKILLed after a checkpoint, resumes from
    the bucket to the end, repeating the killed run's steps exactly and logging each step once, and eval.py reads
    the run from the bucket and writes its results there."""
    run, cwd = bucket / "run", tmp_path / "cwd"
    cwd.mkdir()
    proc = _start("train.py", ["--workdir=gs://bkt/run", *RUN_FLAGS], cwd, tmp_path / "killed.log")
    deadline, saved = time.time() + 300, []
    # Until a checkpoint and two later steps (to redo): the records are uploaded after each checkpoint.
    while proc.poll() is None and time.time() < deadline:
        saved = saved or _committed_steps(run / "checkpoints")
        logged = _losses(run) if saved else []
        if logged and logged[-1][0] >= saved[-1] + 2:
            break
        time.sleep(0.05)
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not finished, f"the run ended before it could be killed:\n{(tmp_path / 'killed.log').read_text()[-3000:]}"
    saved, before = _committed_steps(run / "checkpoints"), _losses(run)
    assert saved and saved[-1] < STEPS and before, (saved, before)

    log = tmp_path / "resumed.log"
    assert _start("train.py", ["--workdir=gs://bkt/run", *RUN_FLAGS], cwd, log).wait(600) == 0, log.read_text()[-3000:]
    after = _losses(run)
    assert [s for s, _ in after] == list(range(1, STEPS + 1))  # each step once: the killed run's later ones dropped
    assert (run / "metrics.jsonl").read_text().count("\n") == STEPS
    for step, loss in before:  # kept up to the checkpoint, and repeated exactly after it
        assert dict(after)[step] == loss, f"step {step} after resuming: {dict(after)[step]!r} != {loss!r}"
    assert _committed_steps(run / "checkpoints")[-1] == STEPS
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == STEPS

    evaluate = _start("eval.py", ["--checkpoint=gs://bkt/run", "--output=gs://bkt/eval", "--num_steps=1,2",
                                  "--tasks=shell:1-4:size=8:name=short", "--exit_criterion=none",
                                  "--batch_size=8"], cwd, log := tmp_path / "eval.log")
    assert evaluate.wait(timeout=600) == 0, log.read_text()[-3000:]
    results = json.loads((bucket / "eval" / "results.json").read_text())
    assert [e["setting"] for e in results["results"]] == ["r=1", "r=2"]
    assert results["plots"] == ["plots/short__acc.png"]
    assert (bucket / "eval" / "plots" / "short__acc.png").read_bytes().startswith(b"\x89PNG")
    assert len((bucket / "eval" / "samples" / "short" / "r_1.jsonl").read_text().splitlines()) == 8
    assert list(cwd.iterdir()) == [] and not (ROOT / "gs:").exists()  # nothing written locally
