"""Run telemetry beside metrics.jsonl: TensorBoard event files of the logged metrics and a jax.profiler trace of
chosen steps, in a local or an object-store (gs://) workdir reached through etils.epath.

Object stores cannot append to an object, so a file written there is kept in memory and the whole object
rewritten at each flush (`ObjectAppender`); the files written this way (metrics, scalar event files) stay small.
"""

from __future__ import annotations

import numbers
import os
import pathlib
import shutil
import tempfile
import time
from typing import BinaryIO

import jax
from etils import epath
from tensorboardX import SummaryWriter, record_writer

from recurrent_depth.errors import ConfigError
from recurrent_depth.runtime.paths import is_url

TENSORBOARD_DIR = "tensorboard"  # in a train.py workdir
PROFILE_DIR = "profile"
REMOTE_SCHEMES = ("gs", "s3")


class ObjectAppender:
    """A binary file opened for appending in an object store: the content (the existing object's first) is kept in
    memory and the whole object rewritten at each flush."""

    def __init__(self, path: epath.Path, append: bool = True):
        self.path = path
        self.buffer = bytearray(path.read_bytes() if append and path.exists() else b"")
        self.dirty = not append  # a new file exists from its first flush, as a local one would
        self.closed = False

    def write(self, data: bytes) -> int:
        self.buffer += data
        self.dirty = True
        return len(data)

    def flush(self) -> None:
        if self.dirty and not self.closed:
            self.path.write_bytes(bytes(self.buffer))
            self.dirty = False

    def close(self) -> None:
        self.flush()
        self.closed = True


def open_append(path: str | os.PathLike) -> BinaryIO | ObjectAppender:
    """`path` opened for appending bytes, locally or in an object store; its parent folder is created."""
    path = epath.Path(path)
    if is_url(path):
        return ObjectAppender(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "ab")


class _EpathRecordWriterFactory:
    """tensorboardX's writer factory for object-store URLs, through epath: the credentials and endpoints
    (STORAGE_EMULATOR_HOST) that Orbax and the rest of the project use, and no second GCS client."""

    def open(self, path: str) -> ObjectAppender:
        return ObjectAppender(epath.Path(path), append=False)  # each event file is new (its name has the time)

    def directory_check(self, path: str) -> None:
        pass  # object stores have no folders to create


for _scheme in REMOTE_SCHEMES:
    record_writer.register_writer_factory(_scheme, _EpathRecordWriterFactory())


class TensorBoardWriter:
    """Every numeric value of a logged record as a TensorBoard scalar (tag = the record's key) in `logdir`.

    `purge_step` (a resumed run's first step) hides the events of earlier runs from that step on, so steps logged
    again after a crash show once."""

    def __init__(self, logdir: str | os.PathLike, purge_step: int | None = None):
        # The name's suffix keeps a restart within the same second from overwriting the previous run's file, and
        # files sorted by name in the order of the runs that wrote them (the order TensorBoard reads them in).
        self.writer = SummaryWriter(os.fspath(logdir), purge_step=purge_step, filename_suffix=f".{time.time_ns()}")

    def write(self, step: int, record: dict) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                self.writer.add_scalar(key, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def parse_profile_steps(value) -> tuple[int, int] | None:
    """train.profile_steps ('first,end' or a pair) -> (first, end), None when empty; ConfigError if malformed."""
    if value is None or (isinstance(value, str) and not value.strip()) or (not isinstance(value, str) and not value):
        return None
    try:
        parts = value.strip("()[] ").split(",") if isinstance(value, str) else list(value)
        first, end = (int(p) if isinstance(p, str) else p for p in parts)
    except (TypeError, ValueError):  # not two items, or not numbers
        first = end = None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (first, end)):
        raise ConfigError(f"train.profile_steps must be 'first,end', two step numbers such as '20,25' (steps "
                          f"20-24 are traced), got {value!r}")
    if not 0 < first < end:
        raise ConfigError(f"train.profile_steps needs 0 < first < end (steps first..end-1 are traced), got {value!r}")
    return first, end


class StepProfiler:
    """A jax.profiler trace of steps first..end-1 (train.profile_steps) into `logdir`; for an object-store workdir
    the trace is written to a local folder and copied there when it stops."""

    def __init__(self, steps, logdir: str | os.PathLike):
        self.window = parse_profile_steps(steps)
        self.logdir = epath.Path(logdir)
        self.trace_dir: str | None = None  # while tracing

    def before_step(self, step: int) -> None:
        """Starts the trace before the window's first step (or the first step of a run resumed inside it)."""
        if self.window and self.trace_dir is None and self.window[0] <= step < self.window[1]:
            self.trace_dir = tempfile.mkdtemp(prefix="profile-") if is_url(self.logdir) else os.fspath(self.logdir)
            jax.profiler.start_trace(self.trace_dir)

    def after_step(self, step: int, state) -> None:
        """Stops the trace once the window's last step has run on the device."""
        if self.trace_dir is not None and step >= self.window[1] - 1:
            self.stop(state)

    def stop(self, state=None) -> None:
        """Ends a running trace after `state` is computed (None: at once, e.g. after an error) and writes it out."""
        if self.trace_dir is None:
            return
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        local, self.trace_dir = pathlib.Path(self.trace_dir), None  # a local folder
        if is_url(self.logdir):
            for file in local.rglob("*"):
                if file.is_file():
                    (self.logdir / file.relative_to(local)).write_bytes(file.read_bytes())
            shutil.rmtree(local)
