"""Opening any checkpoint: a Hugging Face directory, a parameter checkpoint or a train.py workdir, with the helpers
every tool shares (its run config, its tokenizer, the check of its shape against a config)."""

from __future__ import annotations

import json
import math
import os

import jax
import ml_collections
from etils import epath

from recurrent_depth.checkpoint.huggingface import CONFIG_FILE as HF_CONFIG_FILE
from recurrent_depth.checkpoint.huggingface import from_huggingface, load_hf_config
from recurrent_depth.checkpoint.params import CONFIG_FILE, load_params, load_params_config
from recurrent_depth.checkpoint.train_state import (
    CHECKPOINTS_DIR,
    RUN_CONFIG_FILE,
    load_workdir_params,
    workdir_run_config,
)
from recurrent_depth.data.tokenizer import Tokenizer, load_tokenizer
from recurrent_depth.errors import ConfigError
from recurrent_depth.model.config import DTYPES, ModelConfig
from recurrent_depth.model.lm import RecurrentDepthLM
from recurrent_depth.runtime.config_file import load_config_file
from recurrent_depth.runtime.paths import as_path

# Fields that may differ between a --config and the checkpoint: they change neither the parameters nor the function.
RUNTIME_FIELDS = ("dtype", "param_dtype", "attention_impl", "remat_policy", "mean_recurrence", "mean_backprop_depth",
                  "init_scale")


def check_config(checkpoint_config: ModelConfig, config: ModelConfig, where: str) -> None:
    """Raises ConfigError naming every architectural field in which the checkpoint differs from `config`
    (defaults resolved: an unset head_dim or state_init_std equals its derived value)."""
    def resolved(c: ModelConfig) -> dict:
        return c.replace(head_dim=c.resolved_head_dim, state_init_std=c.resolved_state_init_std).to_dict()

    ours, theirs = resolved(checkpoint_config), resolved(config)
    diffs = [f"{name}: checkpoint {ours[name]!r} != config {theirs[name]!r}" for name in ours
             if name not in RUNTIME_FIELDS and ours[name] != theirs[name] and not (
                 isinstance(ours[name], float) and math.isclose(ours[name], theirs[name], rel_tol=1e-6))]
    if diffs:
        raise ConfigError(f"the checkpoint does not match {where}:\n  " + "\n  ".join(diffs))


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
                            f"checkpoint ({CONFIG_FILE}) nor a train.py workdir "
                            f"({RUN_CONFIG_FILE} + {CHECKPOINTS_DIR}/)")


def hf_dtype(path: str | os.PathLike) -> str:
    """The dtype a Hugging Face checkpoint's config.json names (`torch_dtype`, or `dtype` as newer transformers
    write it): bfloat16 for huginn-0125, so that it loads in the half of the memory it was released in; float32
    where it names none or one this model does not run in."""
    hf = json.loads((as_path(path) / HF_CONFIG_FILE).read_text())
    name = str(hf.get("torch_dtype") or hf.get("dtype") or "float32").removeprefix("torch.")
    return name if name in DTYPES else "float32"


def load_model_config(path: str | os.PathLike) -> ModelConfig:
    """The model config of what `load_model(path)` loads, from its config file alone (no parameter is read)."""
    path = as_path(path)
    kind = _checkpoint_kind(path)
    if kind == "workdir":
        return ModelConfig.from_dict(workdir_run_config(path)["model"])
    return load_hf_config(path, hf_dtype(path)) if kind == "huggingface" else load_params_config(path)


def load_model(path: str | os.PathLike, dtype: str | None = None, shardings=None) -> tuple[RecurrentDepthLM, dict]:
    """Loads a Hugging Face checkpoint directory (config.json), a parameter checkpoint (model_config.json) or the
    newest checkpoint of a train.py workdir (config.json + checkpoints/), local or gs://, each array straight
    into `shardings` (a tree of shardings or a function of the config such as `param_shardings(mesh)`).
    `dtype` None keeps the checkpoint's own: a Hugging Face config.json's (`hf_dtype`), the stored arrays' else."""
    path = as_path(path)
    kind = _checkpoint_kind(path)
    if kind == "huggingface":
        return from_huggingface(path, dtype=dtype or hf_dtype(path), shardings=shardings)
    model, params = load_workdir_params(path, shardings) if kind == "workdir" else load_params(path, shardings)
    if dtype is not None:  # a cast keeps each array's sharding
        params = jax.tree.map(lambda x: x.astype(dtype), params)
        model = RecurrentDepthLM(model.config.replace(dtype=dtype, param_dtype=dtype))
    return model, params


def checkpoint_run_config(checkpoint: epath.Path, config_file: str | None) -> ml_collections.ConfigDict | None:
    """The --config file's config, else a train.py workdir's own run config, else None."""
    if config_file:
        return load_config_file(config_file)
    run_config = workdir_run_config(checkpoint)
    return None if run_config is None else ml_collections.ConfigDict(run_config)


def find_tokenizer(checkpoint: str | os.PathLike, path: str | None = None,
                   run_config: ml_collections.ConfigDict | None = None) -> Tokenizer:
    """`path` (a SentencePiece .model, a tokenizer.json or its directory), else the checkpoint's tokenizer.json,
    else the run config's data.tokenizer."""
    checkpoint = as_path(checkpoint)
    if path:
        return load_tokenizer("sentencepiece" if str(path).endswith(".model") else "huggingface", path)
    if (checkpoint / "tokenizer.json").exists():
        return load_tokenizer("huggingface", checkpoint)
    named = run_config is not None and run_config.get("data") and run_config.data.tokenizer
    if named and (named.path or named.kind == "shell_game"):
        return load_tokenizer(named.kind, named.path)
    raise FileNotFoundError(f"no tokenizer for {checkpoint}: it has no tokenizer.json and no config names one; "
                            f"pass --tokenizer=PATH (a SentencePiece .model or a tokenizer.json)")
