"""Parameter checkpoints for inference and conversion: DIR/model_config.json and DIR/params/ (an Orbax directory,
written atomically), each array restored straight into its sharding."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from recurrent_depth.errors import CheckpointError
from recurrent_depth.model.config import ModelConfig
from recurrent_depth.model.lm import RecurrentDepthLM, init_params
from recurrent_depth.runtime import sharding
from recurrent_depth.runtime.paths import as_path, check_bucket

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def param_shardings(mesh, rules=None):
    """A function ModelConfig -> the parameters' NamedShardings on `mesh` under the logical `rules` (default
    sharding.DEFAULT_RULES): what the loaders below take as `shardings`."""
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


def load_params_config(path: str | os.PathLike) -> ModelConfig:
    path = as_path(path)
    if not (path / CONFIG_FILE).exists():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {path} (not a parameter checkpoint of recurrent_depth)")
    return ModelConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))


def load_params(path: str | os.PathLike, shardings=None) -> tuple[RecurrentDepthLM, dict]:
    """Reads a checkpoint written by `save_params`, each array straight into its sharding (`shardings`: a tree
    or a function of the config, see `param_shardings`; None: one device).  Returns (model, params); shapes are
    checked against the config."""
    path = as_path(path)
    config = load_params_config(path)
    if not (path / PARAMS_DIR).is_dir():
        raise FileNotFoundError(f"no {PARAMS_DIR}/ directory in {path}")
    target = abstract_params(config, shardings)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(path / PARAMS_DIR, target)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"parameters in {path} do not match its {CONFIG_FILE}: {err}") from err
    return RecurrentDepthLM(config), params
