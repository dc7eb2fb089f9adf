"""Two processes x 4 CPU devices (jax.distributed over localhost) against one process x 8 devices: training steps
and evaluation (scores, adaptive-exit scores, generations) give the same results; a run trained by the two
processes resumes in one process on another mesh with the losses of an uninterrupted run; both processes fall
back together from a checkpoint only one of them cannot read."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import eval_requests, local_iterator, mixture_run_config, run_steps, small_config, write_mixture_corpus
from recurrent_depth.evaluation import Depth, EvalModel
from recurrent_depth.sharding import make_mesh
from recurrent_depth.shell_game import ShellGameTokenizer
from recurrent_depth.train_loop import train
from recurrent_depth.training import Trainer


@pytest.mark.slow
def test_two_processes_train_and_evaluate_like_one(tiny, tmp_path):
    portpicker = pytest.importorskip("portpicker")
    port, out = portpicker.pick_unused_port(), tmp_path / "result.json"
    worker = Path(__file__).parent / "multihost_worker.py"
    corpus = write_mixture_corpus(tmp_path / "corpus")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, str(worker), str(port), str(i), str(out), str(corpus)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    # The single-process reference runs meanwhile (the workers spend most of their time compiling).
    config = small_config()
    losses, checksum = run_steps(Trainer(config, make_mesh((2, 2, 2))), local_iterator(config), steps=3)
    model, params = tiny
    lm = EvalModel(model, params, ShellGameTokenizer(), mesh=make_mesh((1, -1, 1)), batch_size=8, progress=False)
    requests, prompts = eval_requests()
    fixed, adaptive = lm.loglikelihood(requests, Depth(2)), lm.loglikelihood(requests, Depth(4, "kl", 1e-2))
    tokens = lm.generate(prompts, Depth(3), max_new_tokens=4, stop_ids=[]).tokens
    mixture = mixture_run_config(corpus)
    mixture.train.steps = 6
    train(mixture, tmp_path / "uninterrupted")

    logs = [p.communicate(timeout=400)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
    result = json.loads(out.read_text())
    np.testing.assert_allclose(result["train"]["losses"], losses, rtol=1e-6)
    np.testing.assert_allclose(result["train"]["checksum"], checksum, rtol=1e-6)
    result = result["eval"]
    np.testing.assert_allclose(result["fixed"], fixed.logprob, rtol=1e-5)
    np.testing.assert_allclose(result["adaptive"], adaptive.logprob, rtol=1e-5)
    np.testing.assert_array_equal(result["adaptive_steps"], adaptive.steps)
    assert result["tokens"] == tokens

    # Both processes skipped step 4 (unreadable on process 1 only) and restored step 2, each with a warning.
    restores = json.loads(out.read_text())["elastic"]["restores"]
    assert [r[:2] for r in restores] == [[2, 1], [2, 1]] and restores[1][2] == 1, restores
    # The run the two processes saved at step 4 resumes in one process on another mesh shape.
    mixture.mesh.shape = (2, 2, 2)
    train(mixture, corpus / "run")
    reference, resumed = _losses(tmp_path / "uninterrupted"), _losses(corpus / "run")
    assert sorted(resumed) == sorted(reference) == list(range(1, 7))
    np.testing.assert_allclose([resumed[s] for s in range(1, 7)], [reference[s] for s in range(1, 7)], rtol=1e-5)
    assert not list((corpus / "run" / "checkpoints").rglob("process_*-of-*")), "a per-process data state"


def _losses(workdir):
    """step -> logged loss (the last record of a step logged twice)."""
    return {r["step"]: r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}
