"""Train-state checkpoints of a train.py workdir: WORKDIR/config.json (the resolved run config) and
WORKDIR/checkpoints/<step>/ with the train state and the data-iterator state (the same on every process, so any
process count restores it)."""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import time
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from recurrent_depth.checkpoint.params import abstract_params
from recurrent_depth.errors import CheckpointError
from recurrent_depth.model.config import ModelConfig
from recurrent_depth.model.lm import RecurrentDepthLM
from recurrent_depth.runtime.paths import as_path, check_bucket

RUN_CONFIG_FILE = "config.json"  # in a train.py workdir, beside CHECKPOINTS_DIR
CHECKPOINTS_DIR = "checkpoints"
# Seconds slept before each retry of a checkpoint read that failed with a transient storage error; once they run
# out the error is raised (a flaky read must not throw away the newest checkpoint).
RETRY_DELAYS = (1.0, 4.0, 16.0)


def workdir_run_config(path: epath.Path) -> dict | None:
    """The run config a train.py workdir at `path` saved (its RUN_CONFIG_FILE beside CHECKPOINTS_DIR), else None."""
    if (path / RUN_CONFIG_FILE).exists() and (path / CHECKPOINTS_DIR).is_dir():
        return json.loads((path / RUN_CONFIG_FILE).read_text())
    return None


def load_workdir_params(workdir: str | os.PathLike, shardings=None) -> tuple[RecurrentDepthLM, dict]:
    """The parameters of the newest readable checkpoint of a train.py workdir, restored alone (not the optimizer
    state) straight into `shardings` (a tree or a function of the config; None: one device)."""
    workdir = as_path(workdir)
    run_config = workdir_run_config(workdir)
    if run_config is None:
        raise FileNotFoundError(f"{workdir} is not a train.py workdir ({RUN_CONFIG_FILE} + {CHECKPOINTS_DIR}/)")
    config = ModelConfig.from_dict(run_config["model"])
    target = {"params": abstract_params(config, shardings)}
    if shardings is None:  # Orbax would otherwise restore onto the devices that saved
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), target)
    checkpointer = TrainCheckpointer(workdir / CHECKPOINTS_DIR, every=1, keep=1 << 30, async_save=False)
    try:  # the same agreed fallback as a resumed run's
        state = checkpointer.restore_latest(target, partial=True, quarantine=False)  # a reader moves nothing
    finally:
        checkpointer.close()
    if state is None:
        raise FileNotFoundError(f"no checkpoint in {workdir / CHECKPOINTS_DIR}")
    return RecurrentDepthLM(config), state["params"]


class TrainCheckpointer:
    """Orbax checkpoints of the train state and the data-iterator state under one directory.

    Saves every `every` steps (asynchronously if asked), keeps the newest `keep` (plus every `keep_every`-th);
    each checkpoint is committed atomically by Orbax, so a crash mid-save leaves the previous one intact.  The
    data state is the grain iterator's state, the same on every process (the step reached, see
    recurrent_depth.data), saved once as JSON: any number of processes can restore it.
    """

    def __init__(self, directory: str | os.PathLike, every: int, keep: int, keep_every: int = 0,
                 async_save: bool = True):
        if every <= 0 or keep <= 0:
            raise ValueError(f"checkpoint.every ({every}) and checkpoint.keep ({keep}) must be positive")
        options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                               keep_period=keep_every or None,
                                               enable_async_checkpointing=async_save, create=True)
        self.directory, self.every = as_path(directory), every
        check_bucket(self.directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._pending = None  # the step of the last save started, until it is known to be committed

    def save(self, step: int, state, iterator, force: bool = False) -> bool:
        """Saves if `step` is due (or `force`); returns whether a save started.  A failed save, this one or the
        previous one (async saves fail in the background), raises: see `_raise_save_fault`."""
        if not force and step % self.every:  # the common case, without Orbax's per-call checks
            return False
        self.wait()  # the previous save first (Orbax waits for it too), so that its failure names its step
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(iterator.get_state()))
        try:
            started = self.manager.save(step, args=args, force=force)
        except Exception as err:  # noqa: BLE001 - classified there
            _raise_save_fault(err, self.directory / str(step))
        self._pending = step if started else None
        return started

    def restore_latest(self, abstract_state, iterator=None, partial: bool = False, quarantine: bool = True):
        """The newest checkpoint that every process can read, restored onto `abstract_state`'s shardings (so the
        mesh and the process count may differ from the ones that saved), with `iterator` (if given) set to its
        data state; None if there is no checkpoint.  `partial`: `abstract_state` names a part of the saved state
        (e.g. {"params": ...}), and only that part is read.

        What a failed read means (`restore_fault`): a transient storage error is retried (RETRY_DELAYS), then
        raised; a corrupt checkpoint (on any process) is skipped by all processes, with a warning, and once an
        older one restores, the skipped ones are moved aside (`quarantine`; so that later saves at their steps
        succeed); any other error (a state of another config: CheckpointError) is raised on every process."""
        skipped = []  # (step, why) of the newer checkpoints found corrupt
        for step in sorted(self.manager.all_steps(), reverse=True):
            path, error, state = self.directory / str(step), None, None
            try:
                state, data = self._read_retrying(step, abstract_state, iterator is not None, partial)
                if iterator is not None:
                    iterator.set_state(data)
            except Exception as err:  # noqa: BLE001 - classified below, after every process has said how it went
                error = err
            fault = "none" if error is None else restore_fault(error)
            codes = _all_processes(_FAULT_CODES[fault])
            if max(codes) == _FAULT_CODES["other"]:
                _raise_fault(error, fault, path, [i for i, c in enumerate(codes) if c == _FAULT_CODES["other"]])
            if max(codes) == _FAULT_CODES["none"]:
                if skipped and quarantine:
                    self._quarantine(skipped)
                return state
            why = (f"{type(error).__name__}: {str(error)[:300]}" if error is not None else
                   f"corrupt on process(es) {[i for i, c in enumerate(codes) if c]}")
            warnings.warn(f"checkpoint {path} is unreadable ({why}); all processes try the previous one",
                          stacklevel=2)
            skipped.append((step, why))
        if skipped:
            raise CheckpointError(f"every checkpoint in {self.directory} is corrupt, none was moved aside (move them "
                                  "away to start afresh):\n" + "\n".join(f"step {s}: {w[:500]}" for s, w in skipped))
        return None

    def _read_retrying(self, step: int, abstract_state, with_data: bool, partial: bool):
        """`_read`, retried after RETRY_DELAYS while it fails with a transient storage error."""
        for delay in RETRY_DELAYS:
            try:
                return self._read(step, abstract_state, with_data, partial)
            except Exception as err:
                if restore_fault(err) != "transient":
                    raise
                warnings.warn(f"reading checkpoint {self.directory / str(step)} failed ({type(err).__name__}: "
                              f"{str(err)[:200]}); retrying in {delay:g} s", stacklevel=3)
                time.sleep(delay)
        return self._read(step, abstract_state, with_data, partial)

    def _quarantine(self, skipped: list[tuple[int, str]]) -> None:
        """Moves the corrupt checkpoints `skipped` aside to <step>.corrupt-<n>, which Orbax does not take for a
        step, kept for inspection: process 0 renames once all processes agreed, the others wait for it, and every
        process's manager forgets the steps (else Orbax declines saves at or before them and refuses a forced
        save at one)."""
        error = None
        if jax.process_index() == 0:
            try:
                for step, why in skipped:
                    n = 1
                    while (self.directory / f"{step}.corrupt-{n}").exists():
                        n += 1
                    (self.directory / str(step)).rename(self.directory / f"{step}.corrupt-{n}")
                    warnings.warn(f"moved the corrupt checkpoint of step {step} ({why[:300]}) aside to "
                                  f"{self.directory / f'{step}.corrupt-{n}'}", stacklevel=3)
            except Exception as err:  # noqa: BLE001 - every process raises, below
                error = err
        failed = _all_processes(int(error is not None))  # also the barrier: the renames are done
        self.manager.reload()
        if any(failed):
            raise CheckpointError(f"could not move the corrupt checkpoint(s) {[s for s, _ in skipped]} in "
                                  f"{self.directory} aside (move or delete them by hand): {error!r}") from error

    def _read(self, step: int, abstract_state, with_data: bool, partial: bool = False):
        """(state, data state) of one checkpoint, read by this process alone: Orbax's item handlers, not its
        checkpointer, whose barriers would wait forever for a process that failed to read."""
        path = epath.Path(self.directory) / str(step)
        if partial:
            handler = ocp.PyTreeCheckpointHandler()
            args = ocp.args.PyTreeRestore(item=abstract_state, partial_restore=True,
                                          restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
        else:
            handler, args = ocp.StandardCheckpointHandler(), ocp.args.StandardRestore(abstract_state)
        try:
            state = handler.restore(path / "state", args=args)
        finally:
            handler.close()
        if not with_data:
            return state, None
        legacy = sorted((path / "data").glob("process_*-of-*.json"))  # grain's per-process files (older runs)
        if legacy and not (path / "data" / "metadata").exists():
            return state, json.loads(legacy[0].read_text())  # a generated task's state: the same on every process
        return state, ocp.JsonCheckpointHandler().restore(path / "data", args=ocp.args.JsonRestore())

    def wait(self) -> None:
        """Waits for the save in progress; raises (`_raise_save_fault`) if it failed."""
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001 - classified there
            _raise_save_fault(err, self.directory if step is None else self.directory / str(step))

    def close(self) -> None:
        self.manager.close()


# Exchanged between processes; a transient error gets here only once its retries ran out, and then stops the restore.
_FAULT_CODES = {"none": 0, "corrupt": 1, "transient": 2, "other": 2}
# Statuses of tensorstore (Orbax's array storage) errors, at the start of their messages.
_CORRUPT_STATUS = re.compile(r"\b(NOT_FOUND|DATA_LOSS|OUT_OF_RANGE|FAILED_PRECONDITION):")
_TRANSIENT_STATUS = re.compile(r"\b(UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED):")
_TRANSIENT_HTTP = re.compile(r"\bHTTP(?: response)?(?: status)?(?: code)?:? (408|429|5\d\d)\b", re.IGNORECASE)
_OUT_OF_MEMORY = re.compile(r"out of memory", re.IGNORECASE)
# Network file systems (gcsfuse, NFS) report a failed backend read as EIO.
_TRANSIENT_ERRNOS = {errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE,
                     errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EAGAIN, errno.EIO, errno.ESTALE}
# Retryable errors of the cloud clients, looked up only where the client is loaded (raising one loads it).
_TRANSIENT_TYPES = {"google.api_core.exceptions": ("TooManyRequests", "ServerError", "RetryError"),
                    "google.auth.exceptions": ("TransportError",),
                    "requests.exceptions": ("ConnectionError", "Timeout", "ChunkedEncodingError"),
                    "aiohttp": ("ClientConnectionError", "ClientPayloadError")}


def restore_fault(err: BaseException) -> str:
    """What a failed checkpoint read means, judged from `err` and the errors it came from: "transient" (storage
    unreachable or throttled: read again), "corrupt" (missing, truncated or undecodable files: fall back to an
    older checkpoint) or "other" (out of memory, a state of another config, a bug: neither)."""
    chain = _error_chain(err)
    if any(isinstance(e, MemoryError) or _OUT_OF_MEMORY.search(str(e)) for e in chain):
        return "other"
    if any(_is_transient(e) for e in chain):
        return "transient"
    # Any FileNotFoundError while reading a step is about that step's files.
    if any(isinstance(e, (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, EOFError))
           or type(e).__module__.startswith("msgpack") or _CORRUPT_STATUS.search(str(e)) for e in chain):
        return "corrupt"
    return "other"


def _raise_save_fault(error: Exception, path: epath.Path):
    """Raises the error of a checkpoint save to `path` that failed with `error`: a storage error that outlasted
    the storage client's own retries (transient, see `restore_fault`) as a CheckpointError that says what to do (one
    line from train.py), any other error as it is, with a note.  Either way the checkpoint is not committed (Orbax
    commits last), so a restart resumes from the last committed one and saves this step again."""
    if restore_fault(error) == "transient":
        raise CheckpointError(f"saving checkpoint {path} failed: the storage stayed unreachable through its client's "
                              f"retries ({type(error).__name__}: {' '.join(str(error).split())[:300]}); the checkpoint "
                              "is not committed: run the same command again once the storage is reachable, and it "
                              "resumes from the last committed checkpoint") from error
    error.add_note(f"while saving checkpoint {path} (not committed: a restart resumes from the last committed one)")
    raise error


def _is_transient(err: BaseException) -> bool:
    """Whether `err` alone says that the storage was unreachable, slow or throttling (HTTP 408, 429, 5xx)."""
    if isinstance(err, (ConnectionError, TimeoutError)) or (isinstance(err, OSError)
                                                             and err.errno in _TRANSIENT_ERRNOS):
        return True
    codes = [getattr(err, name, None) for name in ("code", "status", "status_code")]  # HTTP clients' errors
    if any(isinstance(c, int) and (c in (408, 429) or 500 <= c < 600) for c in codes):
        return True
    for module, names in _TRANSIENT_TYPES.items():
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(err, tuple(getattr(loaded, n) for n in names if hasattr(loaded, n))):
            return True
    return bool(_TRANSIENT_STATUS.search(str(err)) or _TRANSIENT_HTTP.search(str(err)))


def _error_chain(err: BaseException) -> list[BaseException]:
    """`err`, the errors it was raised from or while handling, and those of an exception group, each once."""
    chain, todo = [], [err]
    while todo:
        e = todo.pop()
        if e is None or any(e is seen for seen in chain):
            continue
        chain.append(e)
        todo += [e.__cause__, None if e.__suppress_context__ else e.__context__,
                 *(e.exceptions if isinstance(e, BaseExceptionGroup) else ())]
    return chain


def _raise_fault(error: BaseException | None, fault: str, path: epath.Path, where: list[int]):
    """Raises the error that stops a restore: this process's own, or one that names the processes that failed."""
    if error is None or fault == "corrupt":
        raise RuntimeError(f"restoring checkpoint {path} failed on process(es) {where} (see their logs)")
    if fault == "transient":
        error.add_note(f"reading checkpoint {path} failed {len(RETRY_DELAYS) + 1} times with transient storage "
                       "errors; not falling back to an older checkpoint: resume when the storage is reachable")
        raise error
    if isinstance(error, ValueError) and not isinstance(error, CheckpointError):  # Orbax's tree and shape checks
        raise CheckpointError(f"checkpoint {path} does not fit the state to restore (does it belong to this "
                              f"config?): {str(error)[:1000]}") from error
    error.add_note(f"while restoring checkpoint {path} (neither corrupt nor a transient storage error, so no "
                   "fallback to an older checkpoint; move it aside to fall back)")
    raise error


def _all_processes(value: int) -> list[int]:
    """`value` of every process, in process order (all of them take part, so all agree on the answer)."""
    if jax.process_count() == 1:
        return [value]
    values = multihost_utils.process_allgather(np.asarray([value], np.int32))[:, 0]  # (gloo mishandles bool)
    return [int(v) for v in values]
