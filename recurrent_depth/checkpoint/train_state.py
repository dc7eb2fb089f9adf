"""Train-state checkpoints of a train.py workdir: WORKDIR/config.json (the resolved run config) and
WORKDIR/checkpoints/<step>/ with the train state and the data-iterator state (the same on every process, so any
process count restores it)."""

from __future__ import annotations

import json
import os
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
        state = checkpointer.restore_latest(target, partial=True)
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

    def save(self, step: int, state, iterator, force: bool = False) -> bool:
        """Saves if `step` is due (or `force`); returns whether a save started."""
        if not force and step % self.every:  # the common case, without Orbax's per-call checks
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(iterator.get_state()))
        return self.manager.save(step, args=args, force=force)

    def restore_latest(self, abstract_state, iterator=None, partial: bool = False):
        """The newest checkpoint that every process can read, restored onto `abstract_state`'s shardings (so the
        mesh and the process count may differ from the ones that saved), with `iterator` (if given) set to its
        data state; None if there is no checkpoint.  A checkpoint unreadable on any process is skipped by all of
        them, with a warning; if none can be read, CheckpointError.  `partial`: `abstract_state` names a part of
        the saved state (e.g. {"params": ...}), and only that part is read."""
        errors = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, data = self._read(step, abstract_state, iterator is not None, partial)
                if iterator is not None:
                    iterator.set_state(data)
                error = None
            except Exception as err:  # noqa: BLE001 - any unreadable checkpoint falls back to the previous one
                error = f"{type(err).__name__}: {str(err)[:300]}"
            failed = _failed_anywhere(error is not None)
            if not failed:
                return state
            where = error or f"unreadable on process(es) {failed}"
            warnings.warn(f"checkpoint {self.directory / str(step)} is unreadable ({where}); all processes try the "
                          "previous one", stacklevel=2)
            errors.append(f"step {step}: {where}")
        if errors:
            raise CheckpointError(f"no checkpoint in {self.directory} could be restored (does it belong to "
                                  f"this config?):\n" + "\n".join(e[:500] for e in errors))
        return None

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
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _failed_anywhere(failed: bool) -> list[int]:
    """The processes on which `failed` is true (all of them take part, so all agree on the answer)."""
    if jax.process_count() == 1:
        return [0] if failed else []
    flags = multihost_utils.process_allgather(np.asarray([failed], np.int32))[:, 0]  # (gloo mishandles bool)
    return [int(i) for i in np.flatnonzero(flags)]
