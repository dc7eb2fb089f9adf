"""Checkpoints: parameter-only ones for inference and conversion, and training ones with exact resume.

A parameter checkpoint DIR holds `model_config.json` and `params/` (an Orbax directory, written atomically).
A training workdir holds `config.json` (the resolved run config) and `checkpoints/<step>/` with the train state
and the data-iterator state (the same on every process, so any process count restores it).
"""

from __future__ import annotations

import json
import os
import warnings

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from recurrent_depth.config import ModelConfig
from recurrent_depth.hf import CONFIG_FILE as HF_CONFIG_FILE
from recurrent_depth.hf import CheckpointError, from_huggingface, load_hf_config
from recurrent_depth.model import RecurrentDepthLM, init_params
from recurrent_depth.paths import as_path, check_bucket

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
RUN_CONFIG_FILE = "config.json"  # in a train.py workdir, beside CHECKPOINTS_DIR
CHECKPOINTS_DIR = "checkpoints"


def param_shardings(mesh, rules=None):
    """A function ModelConfig -> the parameters' NamedShardings on `mesh` under the logical `rules` (default
    sharding.DEFAULT_RULES): what the loaders below take as `shardings`."""
    from recurrent_depth import sharding

    rules = sharding.DEFAULT_RULES if rules is None else rules

    def shardings(config: ModelConfig):
        boxed = jax.eval_shape(lambda: init_params(RecurrentDepthLM(config), jax.random.key(0)))
        return sharding.logical_shardings(boxed, mesh, rules)

    return shardings


def abstract_params(config: ModelConfig, shardings=None):
    """ShapeDtypeStructs of the parameter tree (optionally with shardings: a tree or a function of the config),
    a restore target."""
    shapes = nn.meta.unbox(jax.eval_shape(lambda: init_params(RecurrentDepthLM(config), jax.random.key(0))))
    shardings = shardings(config) if callable(shardings) else shardings
    if shardings is None:
        return shapes
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def save_params(path: str | os.PathLike, config: ModelConfig, params) -> None:
    """Writes the parameters and the model config to `path` (created; an existing `params/` is an error)."""
    path = as_path(path)
    check_bucket(path)
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / PARAMS_DIR, nn.meta.unbox(params))
        checkpointer.wait_until_finished()
    (path / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))


def load_config(path: str | os.PathLike) -> ModelConfig:
    path = as_path(path)
    if not (path / CONFIG_FILE).exists():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {path} (not a parameter checkpoint of recurrent_depth)")
    return ModelConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))


def load_params(path: str | os.PathLike, shardings=None) -> tuple[RecurrentDepthLM, dict]:
    """Reads a checkpoint written by `save_params`, each array straight into its sharding (`shardings`: a tree
    or a function of the config, see `param_shardings`; None: one device).  Returns (model, params); shapes are
    checked against the config."""
    path = as_path(path)
    config = load_config(path)
    if not (path / PARAMS_DIR).is_dir():
        raise FileNotFoundError(f"no {PARAMS_DIR}/ directory in {path}")
    target = abstract_params(config, shardings)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(path / PARAMS_DIR, target)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"parameters in {path} do not match its {CONFIG_FILE}: {err}") from err
    return RecurrentDepthLM(config), params


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


def _checkpoint_kind(path: epath.Path) -> str:
    """'workdir', 'huggingface' or 'params': what `load_model` finds at `path`; FileNotFoundError if none."""
    if workdir_run_config(path) is not None:
        return "workdir"
    if (path / HF_CONFIG_FILE).exists():
        return "huggingface"
    if (path / CONFIG_FILE).exists():
        return "params"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    raise FileNotFoundError(f"{path} is neither a Hugging Face checkpoint ({HF_CONFIG_FILE}), a parameter "
                            f"checkpoint ({CONFIG_FILE}) nor a train.py workdir ({RUN_CONFIG_FILE} + {CHECKPOINTS_DIR}/)")


def load_model_config(path: str | os.PathLike) -> ModelConfig:
    """The model config of what `load_model(path)` loads, from its config file alone (no parameter is read)."""
    path = as_path(path)
    kind = _checkpoint_kind(path)
    if kind == "workdir":
        return ModelConfig.from_dict(workdir_run_config(path)["model"])
    return load_hf_config(path) if kind == "huggingface" else load_config(path)


def load_model(path: str | os.PathLike, dtype: str | None = None, shardings=None) -> tuple[RecurrentDepthLM, dict]:
    """Loads a Hugging Face checkpoint directory (config.json), a parameter checkpoint (model_config.json) or the
    newest checkpoint of a train.py workdir (config.json + checkpoints/), local or gs://, each array straight
    into `shardings` (a tree of shardings or a function of the config such as `param_shardings(mesh)`)."""
    path = as_path(path)
    kind = _checkpoint_kind(path)
    if kind == "huggingface":
        return from_huggingface(path, dtype=dtype or "float32", shardings=shardings)
    model, params = load_workdir_params(path, shardings) if kind == "workdir" else load_params(path, shardings)
    if dtype is not None:  # a cast keeps each array's sharding
        params = jax.tree.map(lambda x: x.astype(dtype), params)
        model = RecurrentDepthLM(model.config.replace(dtype=dtype, param_dtype=dtype))
    return model, params


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
                          "previous one")
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
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([failed], np.int32))[:, 0]  # (gloo mishandles bool)
    return [int(i) for i in np.flatnonzero(flags)]
