"""Telemetry: train.profile_steps validation, TensorBoard events across a resume, metrics, events and traces in
a gs:// workdir (fake-gcs-server on localhost), uploads there that send each byte once and never block the writer,
and each step once after a run is killed and resumed."""

import json
import os
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import pytest
from etils import epath
from tensorboard.backend.event_processing import event_accumulator

from recurrent_depth.errors import ConfigError
from recurrent_depth.training import telemetry
from recurrent_depth.training.loop import train
from recurrent_depth.training.telemetry import (
    METRICS_FILE,
    TENSORBOARD_DIR,
    MetricsWriter,
    StepProfiler,
    TensorBoardWriter,
    parse_profile_steps,
    read_metrics,
)

from helpers import single_cpu_env, small_config


def _scalars(logdir, tag):
    events = event_accumulator.EventAccumulator(str(logdir))
    events.Reload()
    return [(s.step, s.value) for s in events.Scalars(tag)]


def test_profile_steps_parse():
    assert parse_profile_steps("") is None and parse_profile_steps(()) is None
    assert parse_profile_steps("20,25") == (20, 25) == parse_profile_steps(" 20 , 25 ")
    assert parse_profile_steps((3, 4)) == (3, 4) == parse_profile_steps("(3, 4)")


@pytest.mark.parametrize("value", ["25,20", "5,5", "0,3", "-2,3", "7", "1,2,3", "a,b", "2.5,4", (2.0, 4), (True, 3), 7])
def test_bad_profile_steps_raise_a_config_error(value):
    with pytest.raises(ConfigError, match="train.profile_steps"):
        parse_profile_steps(value)


def test_bad_profile_steps_fail_before_anything_is_written(tmp_path):
    config = small_config()
    config.train.profile_steps = "9,3"
    with pytest.raises(ConfigError, match=r"train.profile_steps needs 0 < first < end.*'9,3'"):
        train(config, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_resumed_run_hides_the_steps_it_logs_again(tmp_path):
    first = TensorBoardWriter(tmp_path)
    for step in range(1, 7):
        first.write(step, {"step": step, "loss": float(step), "ok": True, "name": "x"})
    first.close()
    resumed = TensorBoardWriter(tmp_path, purge_step=4)  # the checkpoint was at step 3
    for step in range(4, 8):
        resumed.write(step, {"step": step, "loss": -float(step)})
    resumed.close()
    assert _scalars(tmp_path, "loss") == [(1, 1), (2, 2), (3, 3), (4, -4), (5, -5), (6, -6), (7, -7)]
    events = event_accumulator.EventAccumulator(str(tmp_path))
    events.Reload()
    assert events.Tags()["scalars"] == ["loss"]  # booleans and strings are no scalars


def _local_copy(logdir: epath.Path, tmp_path):
    """The event files of `logdir` (in the bucket) copied to a local folder, which EventAccumulator reads."""
    local = tmp_path / "tensorboard"
    local.mkdir(exist_ok=True)
    for file in logdir.iterdir():
        (local / file.name).write_bytes(file.read_bytes())
    return local


def test_metrics_events_and_traces_in_a_gs_workdir(bucket, tmp_path):
    workdir = bucket / "run"
    for start, steps in ((0, (1, 2, 3)), (3, (4, 5))):  # a run and its resumption append to one metrics.jsonl
        writer = MetricsWriter(workdir, start_step=start)
        for step in steps:
            writer.write({"step": step, "loss": 1.0 / step})
        writer.close()
    lines = (workdir / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5]
    assert len(list((workdir / TENSORBOARD_DIR).iterdir())) == 2  # one event file a run, no temporary objects left
    assert [step for step, _ in _scalars(_local_copy(workdir / TENSORBOARD_DIR, tmp_path), "loss")] == [1, 2, 3, 4, 5]

    profiler = StepProfiler("1,2", workdir / "profile")
    x = jnp.ones((64, 64))
    profiler.before_step(1)
    x = jax.jit(lambda a: a @ a)(x)
    profiler.after_step(1, x)
    traces = list((workdir / "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].read_bytes()
    assert not os.path.exists("gs:")  # nothing went to a local folder named after the URL


def _wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_gs_uploads_send_each_byte_once_and_never_block_the_writer(bucket, monkeypatch):
    """1,010 log steps into gs://: while uploads hang, writes and syncs return at once; each sync (a checkpoint)
    appends only the new bytes, and nothing is uploaded between syncs (FLUSH_SECONDS is 30 s)."""
    monkeypatch.setattr(telemetry, "MIN_UPLOAD_SECONDS", 0.01)
    workdir = bucket / "linear"
    uploaded, gate, write_bytes = {}, threading.Event(), type(workdir).write_bytes

    def counted(path, data):  # every byte that goes up (compose joins objects in the bucket, uploading nothing)
        assert gate.wait(30)
        folder = path.parent.name
        uploaded[folder] = uploaded.get(folder, 0) + len(data)
        return write_bytes(path, data)

    monkeypatch.setattr(type(workdir), "write_bytes", counted)
    metrics, lines = workdir / METRICS_FILE, []

    def log(steps, sync_every):
        for step in steps:
            lines.append(json.dumps({"step": step, "loss": 1.0 / step, "lr": 1e-3}) + "\n")
            writer.write(json.loads(lines[-1]))
            if step % sync_every == 0:
                writer.sync()
                if gate.is_set():
                    _wait_until(lambda: metrics.exists() and len(metrics.read_bytes()) == len("".join(lines)))

    start = time.monotonic()
    writer = MetricsWriter(workdir)
    log(range(1, 101), sync_every=50)
    assert time.monotonic() - start < 5 and not uploaded  # no call waited for the hanging uploads
    gate.set()
    _wait_until(lambda: metrics.exists() and len(metrics.read_bytes()) == len("".join(lines)))
    log(range(101, 1001), sync_every=50)
    log(range(1001, 1011), sync_every=10**9)
    time.sleep(0.2)
    assert len(metrics.read_bytes()) == len("".join(lines[:1000]))  # 1001-1010 wait for close (or FLUSH_SECONDS)
    writer.close()
    assert metrics.read_text() == "".join(lines)
    assert [r["step"] for r in read_metrics(workdir)] == list(range(1, 1011))
    (events,) = (workdir / TENSORBOARD_DIR).iterdir()
    assert uploaded == {"linear": len(metrics.read_bytes()), TENSORBOARD_DIR: len(events.read_bytes())}


WRITER_KILLED = """
import sys, time
from recurrent_depth.runtime.paths import as_path
from recurrent_depth.training.telemetry import TENSORBOARD_DIR, MetricsWriter, read_metrics
workdir = sys.argv[1]
writer = MetricsWriter(workdir)
for step in range(1, 51):
    writer.write({"step": step, "loss": float(step)})
    if step % 20 == 0:
        writer.write({"step": step, "eval_loss_r1": float(step)})
    if step == 40:  # a checkpoint: the records and events so far are uploaded
        writer.sync()
        while not ([r["step"] for r in read_metrics(workdir)][-1:] == [40]
                   and list(as_path(workdir).glob(f"{TENSORBOARD_DIR}/events*"))):
            time.sleep(0.01)
print("written", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("where", ["local", "gs"])
def test_a_killed_and_resumed_run_shows_each_step_once(where, tmp_path, request):
    """A run logs steps 1-50 (its upload after step 40 done) and is killed; resumed from its step-30 checkpoint it
    logs 31-60.  metrics.jsonl, read_metrics and TensorBoard then hold each step once, training and held-out
    evaluation records alike, the later ones from the resumed run."""
    workdir = request.getfixturevalue("bucket") / "resumed" if where == "gs" else tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", WRITER_KILLED, str(workdir)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=single_cpu_env())
    try:
        assert proc.stdout.readline() == b"written\n", proc.stdout.read().decode()[-3000:]
    finally:
        proc.kill()
        proc.wait()
    written = 50 if where == "local" else 40  # in a bucket, steps 41-50 were still waiting for their upload
    assert [r["step"] for r in read_metrics(workdir) if "loss" in r] == list(range(1, written + 1))

    writer = MetricsWriter(workdir, start_step=30)
    for step in range(31, 61):
        writer.write({"step": step, "loss": -float(step)})
        if step % 20 == 0:
            writer.write({"step": step, "eval_loss_r1": -float(step)})
    writer.close()
    records = read_metrics(workdir)
    assert len((workdir / METRICS_FILE).read_text().splitlines()) == len(records)  # the file itself: each once
    assert [(r["step"], r["loss"]) for r in records if "loss" in r] == [(s, s if s <= 30 else -s) for s in
                                                                         range(1, 61)]
    assert [(r["step"], r["eval_loss_r1"]) for r in records if "eval_loss_r1" in r] == [(20, 20), (40, -40), (60, -60)]
    logdir = workdir / TENSORBOARD_DIR if where == "local" else _local_copy(workdir / TENSORBOARD_DIR, tmp_path)
    assert _scalars(logdir, "loss") == [(s, s if s <= 30 else -s) for s in range(1, 61)]
    assert _scalars(logdir, "eval_loss_r1") == [(20, 20), (40, -40), (60, -60)]


def test_read_metrics_skips_torn_lines_and_keeps_the_last_of_each_step_and_kind(tmp_path):
    lines = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 2, "eval_loss_r1": 5.0},
             {"step": 2, "loss": -2.0}]  # step 2 logged again (a file from before runs cut it on resume)
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 3, "lo')
    assert read_metrics(tmp_path) == [lines[0], lines[2], lines[3]]
    assert read_metrics(tmp_path / "nothing") == []
