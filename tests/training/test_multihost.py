"""Two processes x 4 CPU devices (jax.distributed over localhost) against one process x 8 devices: `train` on
mixture data gives the same losses and parameters, the two processes' run resumes in one process on another mesh
exactly, both processes fall back together from a checkpoint only one of them can read, and evaluation (scores,
adaptive-exit scores, generations) gives the same results."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from recurrent_depth.data.pipeline import make_dataset
from recurrent_depth.data.shell_game import ShellGameTokenizer
from recurrent_depth.evaluation import Depth, EvalModel
from recurrent_depth.runtime.sharding import make_mesh
from recurrent_depth.training.loop import train

from helpers import MULTIHOST_STEPS as STEPS
from helpers import eval_requests, mixture_run_config, params_checksum, single_cpu_env, write_mixture_corpus


def _losses(workdir):
    """step -> logged loss."""
    return {r["step"]: r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_two_processes_train_resume_restore_and_evaluate_like_one(tiny, tmp_path):
    portpicker = pytest.importorskip("portpicker")
    port, out = portpicker.pick_unused_port(), tmp_path / "result.json"
    corpus = write_mixture_corpus(tmp_path / "corpus")
    worker = Path(__file__).parents[1] / "multihost_worker.py"
    env = single_cpu_env()
    procs = [subprocess.Popen([sys.executable, str(worker), str(port), str(i), str(out), str(corpus)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    # The single-process references run meanwhile (the workers spend most of their time compiling).
    config = mixture_run_config(corpus)
    config.train.steps, config.mesh.shape = STEPS, (2, 2, 2)
    checksum = params_checksum(train(config, tmp_path / "reference").params)
    model, params = tiny
    lm = EvalModel(model, params, ShellGameTokenizer(), mesh=make_mesh((1, -1, 1)), batch_size=8, progress=False)
    requests, prompts = eval_requests()
    fixed, adaptive = lm.loglikelihood(requests, Depth(2)), lm.loglikelihood(requests, Depth(4, "kl", 1e-2))
    tokens = lm.generate(prompts, Depth(3), max_new_tokens=4, stop_ids=[]).tokens
    # The two processes' run, cut back to its step-4 checkpoint, resumes in one process on another mesh shape (as
    # soon as the processes have trained, while they go on restoring and evaluating).
    two = corpus / "run"  # the two processes' workdir
    deadline = time.time() + 600
    while not (corpus / "trained").exists():
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            pytest.fail("the processes did not train:\n" + "\n".join(p.communicate()[0].decode()[-2000:]
                                                                       for p in procs))
        time.sleep(0.1)
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / str(STEPS))
    (resumed / "metrics.jsonl").write_text("")
    resume_config = mixture_run_config(corpus)
    resume_config.train.steps, resume_config.mesh.shape = STEPS, (1, -1, 1)
    train(resume_config, resumed)

    logs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
    result = json.loads(out.read_text())
    reference = _losses(tmp_path / "reference")
    assert sorted(reference) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([_losses(two)[s] for s in reference], list(reference.values()), rtol=1e-6)
    np.testing.assert_allclose(result["train"]["checksum"], checksum, rtol=1e-6)
    # Every process reads the rows its devices hold: all of them where the tensor axis spans both processes
    # (replicas get identical rows), its half on (2, 2, 2); either way the global batch is the single process's.
    first = next(iter(make_dataset(config.data, batch_size=8, seq_len=config.train.seq_len,
                                   vocab_size=config.model.vocab_size, seed=config.seed)))
    replicas = result["replicas"]
    assert replicas["(1, 1, 8)"]["rows"] == [list(range(8))] * 2
    assert replicas["(2, 2, 2)"]["rows"] == [[0, 1, 2, 3, -1, -1, -1, -1], [4, 5, 6, 7, -1, -1, -1, -1]]
    for shape in replicas.values():
        for key, value in first.items():
            np.testing.assert_array_equal(shape[key], value, err_msg=key)
    evaluated = result["eval"]
    np.testing.assert_allclose(evaluated["fixed"], fixed.logprob, rtol=1e-5)
    np.testing.assert_allclose(evaluated["adaptive"], adaptive.logprob, rtol=1e-5)
    np.testing.assert_array_equal(evaluated["adaptive_steps"], adaptive.steps)
    assert evaluated["tokens"] == tokens

    # Both processes skipped the newest checkpoint (unreadable on process 1 only) and restored the previous one,
    # each with a warning; it was moved aside once, and neither process lists it any more.
    restores = result["restore"]["restores"]
    assert [r[:2] for r in restores] == [[STEPS - 2, 1]] * 2 and restores[1][2] == 1, restores
    assert [r[3] for r in restores] == [STEPS - 2] * 2 and result["restore"]["moved"] == [f"{STEPS}.corrupt-1"]
    # The resumed run trained on the same tokens as the uninterrupted run.
    assert not list((two / "checkpoints").rglob("process_*-of-*")), "a per-process data state"
    assert sorted(_losses(resumed)) == [STEPS - 1, STEPS]
    np.testing.assert_allclose([_losses(resumed)[s] for s in (STEPS - 1, STEPS)],
                               [reference[s] for s in (STEPS - 1, STEPS)], rtol=1e-5)
