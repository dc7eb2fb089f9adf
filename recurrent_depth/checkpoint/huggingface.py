"""Import and export of checkpoints in the released huginn-0125 (Hugging Face safetensors) format.

The original stores PyTorch Linear weights as [out, in], q|k|v fused on the output axis, gate|up fused on the
output axis, `qk_bias` as [2, 1, heads, head_dim] and the adapter as [embed, 2 embed] (state columns first).
Here kernels are [in, ..., out] with the fused axes explicit; `_layout` lists the correspondence once and both
directions use it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util
from safetensors.numpy import save_file

from recurrent_depth.checkpoint.safetensors_reader import SafetensorsFile, load_array
from recurrent_depth.errors import CheckpointError
from recurrent_depth.model.config import DTYPES, ModelConfig
from recurrent_depth.model.lm import RecurrentDepthLM, init_params
from recurrent_depth.runtime.paths import write_atomically, write_text_atomically

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
IGNORED_TENSORS = ("freqs_cis",)  # a stored RoPE table, recomputed here

# (key in the original's config.json, expected value): options of the original this implementation does not have.
SUPPORTED_OPTIONS = {
    "architecture_class_name": "RecurrentGPT",
    "block_class_name": "SandwichBlock",
    "norm_class_name": "RMSNorm_llama",
    "mlp_class_name": "GatedMLP",
    "nonlin_name": "SiLU",
    "injection_type": "linear",
    "state_init": "like-init",
    "bias": False,
    "test_time_noise": 0,
}


@dataclasses.dataclass(frozen=True)
class _Entry:
    hf_name: str
    path: tuple[str, ...]  # path in the Flax parameter tree
    n_in: int | None  # leading input axes of a linear kernel; None: a plain reshape (embeddings, norms, biases)


def _layout(config: ModelConfig) -> list[_Entry]:
    """Every parameter of the model with its name in the original checkpoint."""
    entries = [_Entry("transformer.wte.weight", ("embedding",), None),
               _Entry("transformer.adapter.weight", ("core", "adapter"), 2),
               _Entry("transformer.ln_f.weight", ("ln_f", "scale"), None)]
    if not config.tie_embeddings:
        entries.append(_Entry("lm_head.weight", ("lm_head",), 1))
    blocks = ([(f"transformer.prelude.{i}", (f"prelude_{i}",)) for i in range(config.num_prelude_layers)]
              + [(f"transformer.core_block.{i}", ("core", f"layers_{i}")) for i in range(config.num_core_layers)]
              + [(f"transformer.coda.{i}", (f"coda_{i}",)) for i in range(config.num_coda_layers)])
    for hf_prefix, path in blocks:
        for k in range(1, 5):
            entries.append(_Entry(f"{hf_prefix}.norm_{k}.weight", (*path, f"norm_{k}", "scale"), None))
        entries += [_Entry(f"{hf_prefix}.attn.Wqkv.weight", (*path, "attn", "qkv"), 1),
                    _Entry(f"{hf_prefix}.attn.proj.weight", (*path, "attn", "out"), 2),
                    _Entry(f"{hf_prefix}.mlp.fc.weight", (*path, "mlp", "fc"), 1),
                    _Entry(f"{hf_prefix}.mlp.proj.weight", (*path, "mlp", "proj"), 1)]
        if config.qk_bias:
            entries.append(_Entry(f"{hf_prefix}.attn.qk_bias", (*path, "attn", "qk_bias"), None))
    return entries


def _param_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    boxed = jax.eval_shape(lambda: init_params(RecurrentDepthLM(config), jax.random.key(0)))
    return {k: v.shape for k, v in traverse_util.flatten_dict(nn.meta.unbox(boxed)).items()}


def _hf_shape(entry: _Entry, shape: tuple[int, ...]) -> tuple[int, ...]:
    if entry.n_in is not None:  # torch Linear: [out, in]
        return (math.prod(shape[entry.n_in:]), math.prod(shape[:entry.n_in]))
    if entry.path[-1] == "qk_bias":
        return (shape[0], 1, *shape[1:])
    return shape


def _to_hf(entry: _Entry, array: np.ndarray) -> np.ndarray:
    if entry.n_in is not None:
        return np.ascontiguousarray(array.reshape(math.prod(array.shape[:entry.n_in]), -1).T)
    return array.reshape(_hf_shape(entry, array.shape))


# ---- config ------------------------------------------------------------------------------------------
def config_from_hf(hf: dict, dtype: str = "float32") -> ModelConfig:
    """ModelConfig from the original's config.json; options this implementation lacks raise CheckpointError."""
    for key, expected in SUPPORTED_OPTIONS.items():
        if key in hf and hf[key] != expected:
            raise CheckpointError(f"config.json: {key}={hf[key]!r} is not supported (only {expected!r})")
    heads = hf.get("n_heads", hf.get("num_attention_heads"))
    hidden = hf.get("n_embd", hf.get("hidden_size"))
    if hf.get("num_key_value_heads", heads) != heads:
        raise CheckpointError(f"config.json: num_key_value_heads={hf['num_key_value_heads']} != n_heads={heads}: "
                              "grouped-query attention is not supported")
    required = {"n_embd": hidden, "n_heads": heads}
    for key in ("vocab_size", "intermediate_size", "n_layers_in_prelude", "n_layers_in_recurrent_block",
                "n_layers_in_coda", "block_size"):
        required[key] = hf.get(key)
    missing = [k for k, v in required.items() if v is None]
    if missing:
        raise CheckpointError(f"config.json lacks required field(s) {missing}")
    layers = hf["n_layers_in_prelude"] + hf["n_layers_in_recurrent_block"] + hf["n_layers_in_coda"]
    if "n_layers" in hf and hf["n_layers"] != layers:
        raise CheckpointError(f"config.json: n_layers={hf['n_layers']} != prelude + recurrent block + coda = {layers}")
    if "head_dim" in hf and hf["head_dim"] != hidden // heads:
        raise CheckpointError(f"config.json: head_dim={hf['head_dim']} != n_embd // n_heads = {hidden // heads}")
    return ModelConfig(
        vocab_size=hf.get("padded_vocab_size") or hf["vocab_size"],
        hidden_size=hidden,
        num_heads=heads,
        intermediate_size=hf["intermediate_size"],
        num_prelude_layers=hf["n_layers_in_prelude"],
        num_core_layers=hf["n_layers_in_recurrent_block"],
        num_coda_layers=hf["n_layers_in_coda"],
        max_seq_len=hf["block_size"],
        rope_base=float(hf.get("rope_base", 50000.0)),
        norm_eps=float(hf.get("norm_eps", 1e-6)),
        qk_bias=bool(hf.get("qk_bias", True)),
        tie_embeddings=bool(hf.get("tie_embeddings", True)),
        mean_recurrence=hf.get("mean_recurrence", 32),
        mean_backprop_depth=hf.get("mean_backprop_depth", 8),
        state_init_std=(hf.get("init_values") or {}).get("std"),
        dtype=dtype,
        param_dtype=dtype,
    )


def config_to_hf(config: ModelConfig) -> dict:
    """The original's config.json for this model (loads with its `raven_config_minimal.RavenConfig`)."""
    c = config
    return {
        "activation_checkpoint_impl": "per-iteration",
        "architecture_class_name": "RecurrentGPT",
        "architectures": ["RavenForCausalLM"],
        "auto_map": {"AutoConfig": "raven_config_minimal.RavenConfig",
                     "AutoModelForCausalLM": "raven_modeling_minimal.RavenForCausalLM"},
        "bias": False,
        "block_class_name": "SandwichBlock",
        "block_size": c.max_seq_len,
        "effective_expected_depth": c.effective_depth,
        "head_dim": c.resolved_head_dim,
        "init_orthogonal": False,
        "init_strategy": "takase",
        "init_values": {"embed_scale": c.embed_scale, "embedding": c.init_std, "out_proj": c.out_proj_std,
                        "std": c.resolved_state_init_std},
        "injection_type": "linear",
        "intermediate_size": c.intermediate_size,
        "mean_backprop_depth": c.mean_backprop_depth,
        "mean_recurrence": c.mean_recurrence,
        "mlp_class_name": "GatedMLP",
        "model_type": "huginn_raven",
        "n_embd": c.hidden_size,
        "n_heads": c.num_heads,
        "n_layers": c.num_layers,
        "n_layers_in_coda": c.num_coda_layers,
        "n_layers_in_prelude": c.num_prelude_layers,
        "n_layers_in_recurrent_block": c.num_core_layers,
        "nonlin_name": "SiLU",
        "norm_class_name": "RMSNorm_llama",
        "norm_eps": c.norm_eps,
        "num_key_value_heads": c.num_heads,
        "padded_vocab_size": c.vocab_size,
        "padding_multiple": 1,
        "qk_bias": c.qk_bias,
        "rope_base": c.rope_base,
        "sampling_scheme": "poisson-lognormal-filling",
        "state_init": "like-init",
        "test_time_noise": 0,
        "test_time_noise_type": "fixed",
        "tie_embeddings": c.tie_embeddings,
        "torch_dtype": c.param_dtype,
        "vocab_size": c.vocab_size,
    }


def freqs_cis(config: ModelConfig) -> np.ndarray:
    """The original's stored RoPE table [1, block_size, 1, head_dim // 2, 2] of (cos, sin), float32."""
    dim = config.resolved_head_dim
    inv_freq = 1.0 / (np.float32(config.rope_base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    angles = np.outer(np.arange(config.max_seq_len, dtype=np.float32), inv_freq.astype(np.float32))
    table = np.stack([np.cos(angles), np.sin(angles)], axis=-1).astype(np.float32)
    return table[None, :, None]


# ---- import ------------------------------------------------------------------------------------------
def _shard_files(path: epath.Path) -> list[epath.Path]:
    if (path / INDEX_FILE).exists():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{INDEX_FILE} lists shard file(s) that do not exist: {missing}")
        return files
    if (path / SINGLE_FILE).exists():
        return [path / SINGLE_FILE]
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")


def load_hf_config(path: str | os.PathLike, dtype: str = "float32") -> ModelConfig:
    path = epath.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not (path / CONFIG_FILE).exists():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {path}")
    return config_from_hf(json.loads((path / CONFIG_FILE).read_text()), dtype)


def from_huggingface(path: str | os.PathLike, dtype="float32", shardings=None) -> tuple[RecurrentDepthLM, dict]:
    """Loads a huginn-0125-format checkpoint directory (local or gs://).  Returns (model, params) in `dtype`.

    `shardings`: a tree of jax Shardings like the parameters, or a function ModelConfig -> such a tree (e.g.
    `recurrent_depth.checkpoint.param_shardings(mesh)`); None gives uncommitted arrays on the default device.
    Each host reads the stored rows its devices' shards cover once, in bounded blocks, and cuts the shards
    (converted to `dtype`) out of them, so no device, and no host beyond one block plus its local shards of one
    tensor, ever holds the whole model, and no byte is read twice.  The head is
    tied to the embedding whether or not `lm_head.weight` is stored; the stored `freqs_cis` table is ignored.
    """
    dtype = jnp.dtype(dtype).name
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path = epath.Path(path)
    config = load_hf_config(path, dtype)
    shapes = _param_shapes(config)
    if callable(shardings):
        shardings = shardings(config)
    if shardings is None:
        flat_shardings = dict.fromkeys(shapes)
    else:
        flat_shardings = traverse_util.flatten_dict(shardings)
        if set(flat_shardings) != set(shapes):
            raise ValueError(f"shardings do not match the parameters of {path}: missing "
                             f"{sorted('/'.join(k) for k in set(shapes) - set(flat_shardings))}, unexpected "
                             f"{sorted('/'.join(k) for k in set(flat_shardings) - set(shapes))}")
    entries = {e.hf_name: e for e in _layout(config)}
    ignored = set(IGNORED_TENSORS) | ({"lm_head.weight"} if config.tie_embeddings else set())
    flat, unexpected = {}, []
    for file_path in _shard_files(path):
        with SafetensorsFile(file_path) as file:
            for name, (_, stored_shape, _) in sorted(file.tensors.items(), key=lambda t: t[1][2]):  # file order
                if name in ignored:
                    continue
                entry = entries.get(name)
                if entry is None:
                    unexpected.append(name)
                    continue
                expected = _hf_shape(entry, shapes[entry.path])
                if stored_shape != expected:
                    raise CheckpointError(f"tensor {name} has shape {stored_shape}, expected {expected}")
                flat[entry.path] = load_array(file, name, shapes[entry.path], entry.n_in, jnp.dtype(dtype),
                                              flat_shardings[entry.path])
    if unexpected:
        raise CheckpointError(f"unexpected tensor(s) in checkpoint: {sorted(unexpected)}")
    missing = [e.hf_name for e in entries.values() if e.path not in flat]
    if missing:
        raise CheckpointError(f"missing tensor(s) in checkpoint: {missing}")
    return RecurrentDepthLM(config), traverse_util.unflatten_dict(flat)


# ---- export ------------------------------------------------------------------------------------------
def params_to_hf(config: ModelConfig, params) -> dict[str, np.ndarray]:
    """The parameter tree (or a gradient tree of the same shape) as the original's named tensors."""
    flat = traverse_util.flatten_dict(nn.meta.unbox(params))
    tensors = {}
    for entry in _layout(config):
        if entry.path not in flat:
            raise CheckpointError(f"parameter {'/'.join(entry.path)} (for {entry.hf_name}) is missing")
        tensors[entry.hf_name] = _to_hf(entry, np.asarray(jax.device_get(flat[entry.path])))
    return tensors


def to_huggingface(model_or_config, params, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes config.json and safetensors (sharded with an index above `max_shard_bytes`) in the original's format,
    so that a model trained here loads in the original PyTorch code."""
    config = model_or_config.config if isinstance(model_or_config, RecurrentDepthLM) else model_or_config
    path = epath.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = params_to_hf(config, params)
    tensors["freqs_cis"] = freqs_cis(config)
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)
    metadata = {"format": "pt"}
    stale = [path / SINGLE_FILE, path / INDEX_FILE, *path.glob("model-*-of-*.safetensors")]
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_atomically(path / name, lambda tmp, shard=shard: save_file(shard, tmp, metadata=metadata))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": {t: n for n, shard in zip(names, shards) for t in shard}}
        write_text_atomically(path / INDEX_FILE, json.dumps(index, indent=2))
    keep = set(names) | ({INDEX_FILE} if len(shards) > 1 else set())
    for old in stale:  # files of an earlier export in another layout
        if old.name not in keep and old.exists():
            old.unlink()
    write_text_atomically(path / CONFIG_FILE, json.dumps(config_to_hf(config), indent=2))
