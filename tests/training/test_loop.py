"""The training loop: the loss falls and metrics are written, no read from the device between log steps,
TensorBoard events of every logged value, a profile of the chosen steps, and an input prefetch that checkpoints the
iterator exactly."""

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import grain
import jax
import numpy as np
import pytest
from jax._src.array import ArrayImpl
from jax.experimental import multihost_utils
from tensorboard.backend.event_processing import event_accumulator

from recurrent_depth.training.loop import PREFETCH_BATCHES, train
from recurrent_depth.training.step import Trainer

from helpers import local_iterator, single_cpu_env, small_config

ROOT = Path(__file__).parents[2]  # the repository: train.py, eval.py, configs/
LOG_EVERY, STEPS, EVAL_EVERY = 10, 60, 30
GUARDED = range(LOG_EVERY + 1, 2 * LOG_EVERY)  # steps 11-19: no log, checkpoint, evaluation or profile


class DeviceRead(AssertionError):
    """The loop read a value back from the device (or waited for one) where it must not."""


@contextlib.contextmanager
def device_reads_fail(reads: list):
    """Makes every way back from the device raise DeviceRead (and be recorded in `reads`): the transfer guard
    (which XLA enforces on accelerators, not on CPU, where device memory is host memory) and, on every backend,
    the Python entry points a loop syncs through: float/int/bool/device_get of an array, block_until_ready, and
    process_allgather."""

    def fail(*args, **kwargs):
        reads.append(args[:1])
        raise DeviceRead("the step loop read from the device between log steps")

    with contextlib.ExitStack() as stack:
        stack.enter_context(jax.transfer_guard_device_to_host("disallow_explicit"))
        stack.enter_context(mock.patch.object(ArrayImpl, "_value", property(fail)))
        stack.enter_context(mock.patch.object(ArrayImpl, "block_until_ready", fail))
        for name in ("device_get", "block_until_ready"):
            stack.enter_context(mock.patch.object(jax, name, fail))
        stack.enter_context(mock.patch.object(multihost_utils, "process_allgather", fail))
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short run on all eight test devices whose steps 11-19 run with device reads failing;
    (workdir, guarded steps, reads)."""
    workdir = tmp_path_factory.mktemp("run")
    config = small_config()
    config.train.update(steps=STEPS, log_every=LOG_EVERY, peak_flops=1e12, profile_steps="2,3")
    config.train.optimizer.update(warmup_steps=5, peak_learning_rate=3e-3)
    config.mesh.shape = (1, -1, 1)
    config.checkpoint.every = 1000  # only the final checkpoint
    config.eval.update(every=EVAL_EVERY, num_steps=(1, 3), batches=1)
    guarded, reads, control = [], [], []
    step_fn, calls, stack = Trainer.step, [0], contextlib.ExitStack()

    def step(self, state, batch):
        calls[0] += 1
        if calls[0] == GUARDED.stop:
            stack.close()  # before the log step
        if calls[0] == GUARDED.start:
            stack.enter_context(device_reads_fail(reads))
        if calls[0] in GUARDED:
            guarded.append(calls[0])
            if calls[0] == GUARDED.start + 1:  # the detector works: reading the last step's loss fails
                with pytest.raises(DeviceRead):
                    float(control[-1]["loss"])
                reads.pop()
        state, metrics = step_fn(self, state, batch)
        control.append(metrics)
        return state, metrics

    with mock.patch.object(Trainer, "step", step):
        try:
            train(config, workdir)
        finally:
            stack.close()
    return workdir, guarded, reads


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_training_loop_loss_falls_and_metrics_are_written(run):
    records = _records(run[0])
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    for key in ("step", "loss", "grad_norm", "lr", "num_steps_no_grad", "num_steps_with_grad", "tokens_per_sec", "mfu",
                "hfu"):
        assert all(key in r for r in train_records), key
    assert train_records[-1]["loss"] < train_records[0]["loss"] - 1.0  # the progression task is learnable
    assert all(r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1 for r in train_records)
    # Hardware FLOPs add the recomputed forward and the masked gradient iterations (small_config remats).
    assert all(r["hfu"] > r["mfu"] for r in train_records)
    assert [r["step"] for r in records if "eval_loss_r1" in r] == [EVAL_EVERY, STEPS]


def test_steady_state_steps_do_not_read_from_the_device(run):
    _, guarded, reads = run
    assert guarded == list(GUARDED)
    assert reads == []


def test_tensorboard_events_hold_every_logged_value(run):
    workdir = run[0]
    events = event_accumulator.EventAccumulator(str(workdir / "tensorboard"))
    events.Reload()
    expected = {}  # tag -> {step: value} from metrics.jsonl
    for record in _records(workdir):
        for key, value in record.items():
            if key != "step":
                expected.setdefault(key, {})[record["step"]] = value
    assert {"loss", "grad_norm", "lr", "num_steps_no_grad", "num_steps_with_grad", "tokens_per_sec", "mfu",
            "hfu", "eval_loss_r1", "eval_loss_r3"} <= set(expected)
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, values in expected.items():
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == sorted(values), tag
        np.testing.assert_allclose([s.value for s in scalars], [values[s.step] for s in scalars], rtol=1e-6,
                                   err_msg=tag)


def test_profile_steps_write_a_trace(run):
    traces = list((run[0] / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_prefetch_checkpoints_the_iterator_exactly():
    """The prefetching iterator's state is the parent's after the last batch taken, although the thread has read
    further: a restore continues with the next batch, and the state is the one the plain iterator saves."""
    config = small_config()
    plain, prefetched = local_iterator(config), local_iterator(config)
    prefetched = grain.experimental.ThreadPrefetchDatasetIterator(prefetched, PREFETCH_BATCHES)
    for _ in range(3):
        np.testing.assert_array_equal(next(prefetched)["inputs"], next(plain)["inputs"])
    state = prefetched.get_state()
    assert state == plain.get_state()
    following = [next(prefetched) for _ in range(2)]
    prefetched.close()
    resumed = grain.experimental.ThreadPrefetchDatasetIterator(local_iterator(config), PREFETCH_BATCHES)
    resumed.set_state(state)
    for batch in following:
        again = next(resumed)
        for key in batch:
            np.testing.assert_array_equal(again[key], batch[key])
    resumed.close()


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_at_the_same_step(tmp_path):
    """JAX's preemption service carries one process's SIGTERM to the other: both save the same step and exit 0."""
    portpicker = pytest.importorskip("portpicker")
    address = f"127.0.0.1:{portpicker.pick_unused_port()}"
    # A smaller tiny model at a short sequence: the processes compile and step quickly; the stop is what is tested.
    flags = ["--config=configs/tiny.py", "--config.train.steps=100000", "--config.train.log_every=1",
             "--config.train.batch_size=8", "--config.train.seq_len=32", "--config.checkpoint.every=100000",
             "--config.train.peak_flops=1e12", "--config.model.num_prelude_layers=1",
             "--config.model.num_core_layers=1", "--config.model.mean_recurrence=2",
             "--config.model.mean_backprop_depth=1"]
    procs = [subprocess.Popen([sys.executable, "train.py", f"--workdir={tmp_path}", *flags], cwd=ROOT,
                              env=dict(single_cpu_env(), JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
                                       JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.time() < deadline and all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # process 1 only; process 0 writes the metrics
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-2000:] for log in logs)
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == last  # the step both processes stopped at
