"""Parameter-only checkpoints (for inference and conversion): an Orbax tree plus the model config as JSON.

Layout of DIR: `model_config.json` and `params/` (an Orbax StandardCheckpointer directory, written atomically).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from recurrent_depth.config import ModelConfig
from recurrent_depth.hf import CONFIG_FILE as HF_CONFIG_FILE
from recurrent_depth.hf import CheckpointError, from_huggingface
from recurrent_depth.model import RecurrentDepthLM, init_params

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def abstract_params(config: ModelConfig, shardings=None):
    """ShapeDtypeStructs of the parameter tree (optionally with shardings), a restore target."""
    shapes = nn.meta.unbox(jax.eval_shape(lambda: init_params(RecurrentDepthLM(config), jax.random.key(0))))
    if shardings is None:
        return shapes
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def save_params(path: str | os.PathLike, config: ModelConfig, params) -> None:
    """Writes the parameters and the model config to `path` (created; an existing `params/` is an error)."""
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / PARAMS_DIR, nn.meta.unbox(params))
        checkpointer.wait_until_finished()
    (path / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))


def load_config(path: str | os.PathLike) -> ModelConfig:
    path = Path(path)
    if not (path / CONFIG_FILE).exists():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {path} (not a parameter checkpoint of recurrent_depth)")
    return ModelConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))


def load_params(path: str | os.PathLike, shardings=None) -> tuple[RecurrentDepthLM, dict]:
    """Reads a checkpoint written by `save_params`.  Returns (model, params); shapes are checked against the config."""
    path = Path(path).absolute()
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


def load_model(path: str | os.PathLike, dtype: str | None = None) -> tuple[RecurrentDepthLM, dict]:
    """Loads either a Hugging Face checkpoint directory (config.json) or a parameter checkpoint (model_config.json)."""
    path = Path(path)
    if (path / HF_CONFIG_FILE).exists():
        return from_huggingface(path, dtype=dtype or "float32")
    if (path / CONFIG_FILE).exists():
        model, params = load_params(path)
        if dtype is not None:
            params = jax.tree.map(lambda x: x.astype(dtype), params)
            model = RecurrentDepthLM(model.config.replace(dtype=dtype, param_dtype=dtype))
        return model, params
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    raise FileNotFoundError(f"{path} holds neither {HF_CONFIG_FILE} (Hugging Face format) nor {CONFIG_FILE} "
                            "(parameter checkpoint)")
