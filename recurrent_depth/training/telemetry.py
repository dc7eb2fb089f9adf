"""Run telemetry: the metrics file (one JSON record a line), TensorBoard event files of its numbers, and a
jax.profiler trace of chosen steps, in a local or an object-store (gs://) workdir reached through etils.epath.

Where metrics go.  Locally, each record is appended to <workdir>/metrics.jsonl and flushed at once (`tail -f`
follows it).  An object store cannot append, and rewriting an object at each log step would upload bytes growing
with the square of the run's length, on the training thread, faster than GCS's limit of about one write a second
per object.  There each file is an `ObjectAppender`: writes are buffered, and a background thread uploads them at
most every FLUSH_SECONDS (sooner after a checkpoint, and at close), each upload sending only its new bytes, which
GCS compose joins to the end of the object (`append_to_object`).  So metrics.jsonl and each event file stay single
objects (`gsutil cat` reads them), each byte is uploaded once, and the training thread never waits for storage; a
crash loses the records not yet uploaded, which are those of the steps after the last checkpoint once its upload
is through.

A run resumed from a checkpoint first cuts metrics.jsonl before the records of later steps (a crashed run logged
them, and they are logged again), and its TensorBoard events hide the earlier runs' events from that step on, so
each step shows once.  `read_metrics(workdir)` returns the records in step order, each (step, kind of record) once.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import pathlib
import shutil
import socket
import struct
import tempfile
import threading
import time
import uuid
import warnings
from typing import BinaryIO

import fsspec
import jax
from etils import epath
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.record_writer import masked_crc32c

from recurrent_depth.errors import ConfigError
from recurrent_depth.runtime.paths import as_path, is_url

METRICS_FILE = "metrics.jsonl"  # in a train.py workdir
TENSORBOARD_DIR = "tensorboard"
PROFILE_DIR = "profile"
FLUSH_SECONDS = 30.0  # the longest a written record waits for its upload to an object store
MIN_UPLOAD_SECONDS = 1.0  # between two uploads to one object: GCS takes about one write a second per object


def append_to_object(path: epath.Path, data: bytes) -> None:
    """Appends `data` to the object at `path`, creating it.  On GCS only `data` is uploaded, as a temporary object
    that compose joins to the end of `path`; a store without compose has the whole object rewritten."""
    if not path.exists():
        path.write_bytes(data)
    elif str(path).startswith("gs://"):
        part = path.parent / f".append-{uuid.uuid4().hex}"  # no 'tfevents' in the name: TensorBoard skips it
        part.write_bytes(data)
        try:
            fsspec.filesystem("gs").merge(str(path), [str(path), str(part)])
        finally:
            part.unlink(missing_ok=True)
    else:
        path.write_bytes(path.read_bytes() + data)


class ObjectAppender:
    """A binary file opened for appending in an object store, uploaded by a background thread.

    `write` buffers and `flush` marks what is written so far as whole (an upload never ends inside a record); both
    return at once.  The thread uploads the flushed bytes every FLUSH_SECONDS, sooner after `sync`, and at `close`,
    which waits for it.  A failed upload is retried with the next one."""

    def __init__(self, path: epath.Path):
        self.path = path
        self.written, self.flushed = bytearray(), bytearray()
        self.lock, self.wake, self.closing = threading.Lock(), threading.Event(), False
        self.thread = threading.Thread(target=self._upload_loop, name=f"upload {path.name}", daemon=True)
        self.thread.start()

    def write(self, data: bytes) -> int:
        with self.lock:
            self.written += data
        return len(data)

    def flush(self) -> None:
        with self.lock:
            self.flushed += self.written
            self.written.clear()

    def sync(self) -> None:
        """Flushes and has the thread upload now (after at least MIN_UPLOAD_SECONDS since its last upload)."""
        self.flush()
        self.wake.set()

    def close(self) -> None:
        """Uploads the rest and waits for it."""
        if not self.closing:
            self.flush()
            self.closing = True
            self.wake.set()
            self.thread.join()

    def _upload_loop(self) -> None:
        last = -math.inf
        while True:
            self.wake.wait(FLUSH_SECONDS)
            self.wake.clear()
            closing = self.closing  # read before taking the data: all of it was flushed by then
            time.sleep(max(0.0, last + MIN_UPLOAD_SECONDS - time.monotonic()))
            with self.lock:
                data, self.flushed = bytes(self.flushed), bytearray()
            if data:
                try:
                    append_to_object(self.path, data)
                except Exception as err:  # noqa: BLE001 - a storage error must not stop training
                    lost = "; they are lost" if closing else "; retried with the next upload"
                    warnings.warn(f"uploading {len(data)} bytes to {self.path} failed ({type(err).__name__}: "
                                  f"{str(err)[:300]}){lost}", RuntimeWarning, stacklevel=1)
                    with self.lock:
                        self.flushed[:0] = data
                last = time.monotonic()
            if closing:
                return


def drop_records_after(path: epath.Path, step: int) -> None:
    """Cuts the metrics file at `path` before its first record of a step after `step` (or its first torn line): a
    run resumed from `step` logs those steps again.  Records are written in step order, so what stays is a prefix."""
    if not path.exists():
        return
    data = path.read_bytes()
    end = 0
    for line in data.splitlines(keepends=True):
        try:
            record = json.loads(line)
        except ValueError:
            break
        if not line.endswith(b"\n") or record["step"] > step:
            break
        end += len(line)
    if end < len(data):
        if is_url(path):
            path.write_bytes(data[:end])
        else:
            os.truncate(path, end)


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """The records of <workdir>/metrics.jsonl (local or in an object store) in step order, each (step, kind) once,
    the last written winning (a record's kind is its set of keys: training, held-out evaluation); a line cut short
    (a crash, a write in progress) is skipped."""
    path = as_path(workdir) / METRICS_FILE
    records = {}
    for line in path.read_text().splitlines() if path.exists() else ():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        key = (record["step"], tuple(sorted(record)))
        records.pop(key, None)  # the last written goes last among its step's records
        records[key] = record
    return sorted(records.values(), key=lambda r: r["step"])


def open_append(path: epath.Path) -> BinaryIO | ObjectAppender:
    """`path` opened for appending bytes: a local file (its folder created) or an `ObjectAppender`."""
    if is_url(path):
        return ObjectAppender(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "ab")


def sync(file: BinaryIO | ObjectAppender) -> None:
    """Has an `ObjectAppender` upload what is written now, without waiting; a local file is written already."""
    if isinstance(file, ObjectAppender):
        file.sync()


class TensorBoardWriter:
    """Every numeric value of a logged record as a TensorBoard scalar (tag = the record's key) in a new event file
    in `logdir`, written like metrics.jsonl (through `open_append`, one TFRecord per event).

    `purge_step` (a resumed run's first step) hides the events of earlier runs from that step on, so steps logged
    again after a crash show once."""

    def __init__(self, logdir: str | os.PathLike, purge_step: int | None = None):
        # The time in the name keeps a restart from overwriting the previous run's file, and sorts files in the
        # order of the runs that wrote them (the order TensorBoard reads them in).
        self.file = open_append(as_path(logdir) / f"events.out.tfevents.{time.time_ns()}.{socket.gethostname()}")
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        if purge_step is not None:
            self._write(Event(wall_time=time.time(), step=purge_step, session_log=SessionLog(status=SessionLog.START)))
        self.file.flush()

    def _write(self, event: Event) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self.file.write(b"".join((header, struct.pack("<I", masked_crc32c(header)), data,
                                  struct.pack("<I", masked_crc32c(data)))))

    def write(self, step: int, record: dict) -> None:
        values = [Summary.Value(tag=key, simple_value=float(value)) for key, value in record.items()
                  if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool)]
        if values:
            self._write(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))
            self.file.flush()

    def sync(self) -> None:
        sync(self.file)

    def close(self) -> None:
        self.file.close()


class MetricsWriter:
    """Process 0's record of a run: each logged record as a line of <workdir>/metrics.jsonl and its numeric values
    as TensorBoard scalars in <workdir>/tensorboard/.  A run resumed from `start_step` first drops the records of
    later steps (see the module's docstring).  No call waits for an object store but `close`."""

    def __init__(self, workdir: str | os.PathLike, start_step: int = 0):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            workdir = as_path(workdir)
            drop_records_after(workdir / METRICS_FILE, start_step)
            self.file = open_append(workdir / METRICS_FILE)
            self.tensorboard = TensorBoardWriter(workdir / TENSORBOARD_DIR, purge_step=start_step + 1)

    def write(self, record: dict) -> None:
        if self.enabled:
            self.file.write((json.dumps(record) + "\n").encode())
            self.file.flush()  # a local file: written now; an object store: uploaded by the thread
            self.tensorboard.write(record["step"], record)

    def sync(self) -> None:
        """Has the records written so far uploaded now, without waiting (after a checkpoint: they outlive a crash)."""
        if self.enabled:
            sync(self.file)
            self.tensorboard.sync()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tensorboard.close()


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
