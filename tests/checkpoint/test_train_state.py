"""Training checkpoints: exact resume after SIGKILL, SIGTERM, fallback from a corrupt checkpoint, restore onto
another mesh, retention, export from a workdir, and bad input that must leave no checkpoint behind."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from recurrent_depth.checkpoint.huggingface import from_huggingface
from recurrent_depth.checkpoint.loading import load_model
from recurrent_depth.checkpoint.train_state import TrainCheckpointer
from recurrent_depth.cli.convert import main as convert_main
from recurrent_depth.runtime.sharding import make_mesh
from recurrent_depth.training.loop import train
from recurrent_depth.training.step import Trainer

from helpers import local_iterator, single_cpu_env, small_config, smooth_optimizer_config

ROOT = Path(__file__).parents[2]  # the repository: train.py, eval.py, configs/
# A run slow enough per step (~0.1 s) that a kill lands mid-run; logged and checkpointed as the test needs.
RUN_FLAGS = ["--config=configs/tiny.py", "--config.train.steps=12", "--config.train.log_every=1",
             "--config.train.batch_size=16", "--config.train.seq_len=128", "--config.model.mean_recurrence=24",
             "--config.checkpoint.every=6", "--config.train.peak_flops=1e12", "--config.train.optimizer.warmup_steps=4"]


def _run(workdir, extra=(), wait=True):
    env = single_cpu_env()
    cmd = [sys.executable, "train.py", f"--workdir={workdir}", *RUN_FLAGS, *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if wait:
        _finish(proc)
    return proc


def _finish(proc):
    """Waits for a run and checks that it succeeded."""
    out = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, out[-3000:]


def _losses(workdir):
    """step -> loss; a step logged twice (before and after a crash) keeps its last value."""
    records = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _wait_for_step(workdir, proc, step, timeout=300):
    metrics = Path(workdir) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(s >= step for s in _losses(workdir)):
            return
        time.sleep(0.005)
    raise AssertionError(f"the run did not reach step {step}: {proc.communicate()[0].decode()[-2000:]}")


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical_and_workdir_exports(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # The uninterrupted run first: it compiles, and the runs after it find its compilations in the persistent cache
    # (started together, both would compile them).
    _run(straight)
    proc = _run(resumed, wait=False)
    _wait_for_step(resumed, proc, 7)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert max(_losses(resumed)) < 12, "the run finished before it could be killed"
    reference = _losses(straight)
    assert sorted(reference) == list(range(1, 13))
    _run(resumed)  # the same command again
    again = _losses(resumed)
    for step in range(7, 13):
        assert again[step] == reference[step], f"step {step}: {again[step]!r} != {reference[step]!r}"

    # The workdir's newest checkpoint exports to the original's format and reads back.
    model, params = load_model(straight)
    assert convert_main(["to-hf", str(straight), str(tmp_path / "hf")]) == 0
    _, reread = from_huggingface(tmp_path / "hf")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reread)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    proc = _run(tmp_path, extra=["--config.train.steps=100000", "--config.checkpoint.every=100000"], wait=False)
    _wait_for_step(tmp_path, proc, 3)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    last = max(_losses(tmp_path))
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == last  # (Orbax also keeps the run's first checkpoint, step 1)


def test_restore_onto_another_mesh_fallback_and_retention(tmp_path):
    config = smooth_optimizer_config()  # tests/training/test_step.py's programs on (2, 2, 2): compiled once (cache)
    sharded = Trainer(config, make_mesh((2, 2, 2)))
    iterator = local_iterator(config)
    checkpointer = TrainCheckpointer(tmp_path, every=1, keep=2, async_save=False)
    state = sharded.init_state()
    saved = {}
    for step in (1, 2, 3):
        state, _ = sharded.step(state, next(iterator))
        checkpointer.save(step, state, iterator)
        saved[step] = jax.device_get(state.params)
    checkpointer.wait()
    assert checkpointer.manager.all_steps() == [2, 3]  # keep = 2

    single = Trainer(config, make_mesh((1, 1, 1), jax.devices()[:1]))
    restored = checkpointer.restore_latest(single.abstract_state(), local_iterator(config))
    assert int(restored.step) == 3
    assert restored.params["embedding"].sharding.device_set == {jax.devices()[0]}
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(saved[3])):
        np.testing.assert_array_equal(np.asarray(a), b)

    for f in (tmp_path / "3").rglob("*"):  # corrupt the newest checkpoint's array data
        if f.is_file() and "state" in f.parts and f.stat().st_size > 0:
            f.write_bytes(b"\0" * 7)
    with pytest.warns(UserWarning, match="unreadable"):
        fallback = checkpointer.restore_latest(single.abstract_state(), local_iterator(config))
    assert int(fallback.step) == 2
    for a, b in zip(jax.tree.leaves(fallback.params), jax.tree.leaves(saved[2])):
        np.testing.assert_array_equal(np.asarray(a), b)
    checkpointer.close()


def test_unknown_config_field_fails_before_any_checkpoint(tmp_path):
    env = single_cpu_env()
    result = subprocess.run([sys.executable, "train.py", f"--workdir={tmp_path}", "--config=configs/tiny.py",
                             "--config.train.no_such_field=3"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "train.py: error: no such config field: 'no_such_field'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_out_of_range_token_in_pretokenized_data_fails_without_checkpoint(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = np.full((16, 33), 3, np.int64)
    rows[5, 7] = 4000
    pq.write_table(pa.table({"input_ids": pa.array(list(rows), pa.list_(pa.int64()))}), tmp_path / "data.parquet")
    config = small_config()
    config.data.kind = "mixture"
    config.data.sources = [{"kind": "parquet", "paths": str(tmp_path / "data.parquet"), "row_length": 33,
                            "bos_id": 1}]
    config.mesh.shape = (1, -1, 1)
    with pytest.raises(ValueError, match="token id 4000 outside the model's vocabulary"):
        train(config, tmp_path / "workdir")
    checkpoints = tmp_path / "workdir" / "checkpoints"
    assert not checkpoints.exists() or not any(p.name.isdigit() for p in checkpoints.iterdir())


def test_restores_the_data_state_of_older_per_process_checkpoints(tmp_path):
    """Runs saved grain's per-process iterator files; a generated task's (the step) restores on any process count."""
    import grain
    import orbax.checkpoint as ocp

    config = small_config()
    saved = local_iterator(config)
    for _ in range(3):
        next(saved)
    with ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(create=True)) as manager:
        manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.arange(3.0)}),
                                                data=grain.checkpoint.CheckpointSave(saved)))
    assert (tmp_path / "3" / "data" / "process_0-of-1.json").exists()
    checkpointer = TrainCheckpointer(tmp_path, every=1, keep=3, async_save=False)
    resumed = local_iterator(config)
    state = checkpointer.restore_latest({"w": jax.ShapeDtypeStruct((3,), np.float64)}, resumed)
    checkpointer.close()
    np.testing.assert_array_equal(state["w"], np.arange(3.0))
    np.testing.assert_array_equal(next(resumed)["inputs"], next(saved)["inputs"])
