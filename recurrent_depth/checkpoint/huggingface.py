"""Import and export of checkpoints in the released huginn-0125 (Hugging Face safetensors) format.

The original stores PyTorch Linear weights as [out, in], q|k|v fused on the output axis, gate|up fused on the
output axis, `qk_bias` as [2, 1, heads, head_dim] and the adapter as [embed, 2 embed] (state columns first).
Here kernels are [in, ..., out] with the fused axes explicit; `_layout` lists the correspondence once and both
directions use it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util
from safetensors.numpy import save_file

from recurrent_depth.errors import CheckpointError
from recurrent_depth.model.config import DTYPES, ModelConfig
from recurrent_depth.model.lm import RecurrentDepthLM, init_params

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
# safetensors dtype names -> numpy dtypes (bfloat16 from ml_dtypes, as jax uses).
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_READ_CHUNK_BYTES = 64 * 2**20  # most bytes one ranged read of a remote file brings to the host at a time


def _is_local(path: epath.Path) -> bool:
    return "://" not in str(path)


class SafetensorsFile:
    """The tensors of one .safetensors file, read by rows: a memory map for local files, ranged reads for
    remote ones (gs://), so that loading a slice reads only the rows it covers.

    Format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, the data.
    """

    def __init__(self, path: epath.Path):
        self.path = path
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            try:
                header = json.loads(f.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise CheckpointError(f"{path}: not a safetensors file (unreadable header: {err})") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + length
        self.tensors = {}  # name -> (dtype, shape, byte offset from data_start)
        self._mmap = np.memmap(os.fspath(path), np.uint8, mode="r") if _is_local(path) else None
        data_bytes = None if self._mmap is None else len(self._mmap) - self.data_start
        for name, info in header.items():
            if info.get("dtype") not in _ST_DTYPES:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
            dtype, shape, (start, end) = np.dtype(_ST_DTYPES[info["dtype"]]), tuple(info["shape"]), info["data_offsets"]
            if end - start != math.prod(shape) * dtype.itemsize or (data_bytes is not None and end > data_bytes):
                raise CheckpointError(f"{path}: tensor {name} has data offsets {[start, end]} that do not fit its "
                                      f"shape {list(shape)} and dtype {info['dtype']} or the file (truncated?)")
            self.tensors[name] = (dtype, shape, start)

    def rows(self, name: str, rows: np.ndarray, cols: np.ndarray | slice, dtype) -> np.ndarray:
        """stored[rows][:, cols] as `dtype`, the stored tensor viewed as [shape[0], rest] ([1, n] if 1-D).
        Reads each run of consecutive rows once, in chunks of at most _READ_CHUNK_BYTES."""
        stored_dtype, shape, offset = self.tensors[name]
        num_cols = math.prod(shape[1:]) if len(shape) > 1 else math.prod(shape)
        row_bytes = num_cols * stored_dtype.itemsize
        chunk_rows = max(1, _READ_CHUNK_BYTES // max(row_bytes, 1))
        if isinstance(cols, np.ndarray) and len(cols) and np.array_equal(cols, np.arange(cols[0], cols[-1] + 1)):
            cols = slice(int(cols[0]), int(cols[-1]) + 1)  # a contiguous range: a view, not a gather
        runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1) if len(rows) else []
        parts = []
        with contextlib.ExitStack() as stack:
            f = None if self._mmap is not None else stack.enter_context(self.path.open("rb"))
            for run in runs:
                for lo in range(int(run[0]), int(run[-1]) + 1, chunk_rows):
                    hi = min(lo + chunk_rows, int(run[-1]) + 1)
                    start = self.data_start + offset + lo * row_bytes
                    if f is None:
                        raw = self._mmap[start:start + (hi - lo) * row_bytes]
                    else:
                        f.seek(start)
                        raw = np.frombuffer(f.read((hi - lo) * row_bytes), np.uint8)
                    block = raw.view(stored_dtype).reshape(hi - lo, num_cols)
                    parts.append(np.asarray(block[:, cols], dtype=dtype))
        return np.concatenate(parts) if parts else np.zeros((0, num_cols), dtype)[:, cols]


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


def _slice_reader(entry: _Entry, shape: tuple[int, ...]):
    """index (slices of the Flax array) -> (stored rows, stored columns, the Flax block from stored[rows][:, cols]).

    A linear kernel [in..., out...] is the stored [out, in] transposed: its slice needs the stored rows of the
    sliced output units and the columns of the sliced inputs.  Other tensors are stored reshapes that keep the
    leading axis (1-D ones are read as one row).
    """
    def ranges(index, axes):
        return [np.arange(shape[a])[index[a]] for a in axes]

    def flat(parts, dims):  # C-order flat indices over the product of per-axis index ranges
        if not parts:
            return np.zeros(1, np.int64)
        return np.ravel_multi_index(np.meshgrid(*parts, indexing="ij"), dims).ravel()

    def read(index):
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        block_shape = tuple(len(r) for r in ranges(index, range(len(shape))))
        if entry.n_in is not None:
            n = entry.n_in
            rows = flat(ranges(index, range(n, len(shape))), shape[n:])
            cols = flat(ranges(index, range(n)), shape[:n])
            return rows, cols, lambda block: block.T.reshape(block_shape)
        if len(shape) == 1:
            return np.zeros(1, np.int64), np.arange(shape[0])[index[0]], lambda block: block.reshape(block_shape)
        rows = np.arange(shape[0])[index[0]]
        cols = flat(ranges(index, range(1, len(shape))), shape[1:])
        return rows, cols, lambda block: block.reshape(block_shape)

    return read


def _load_array(file: SafetensorsFile, name: str, entry: _Entry, shape, dtype, sharding) -> jax.Array:
    """The Flax array of one stored tensor, each device's shard read straight from the file."""
    read = _slice_reader(entry, shape)

    def shard(index):
        rows, cols, finish = read(index)
        return finish(file.rows(name, rows, cols, dtype))

    if sharding is None:  # uncommitted on the default device, free to join any mesh later (as jnp.asarray is)
        return jnp.asarray(shard((slice(None),) * len(shape)))
    return jax.make_array_from_callback(shape, sharding, shard)


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
    Each device's shard is read straight from the safetensors file (only the rows it covers, converted to
    `dtype`), so no device, and no host beyond one chunk of one tensor, ever holds the whole model.  The head is
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
    for file in map(SafetensorsFile, _shard_files(path)):
        for name, (_, stored_shape, _) in file.tensors.items():
            if name in ignored:
                continue
            entry = entries.get(name)
            if entry is None:
                unexpected.append(name)
                continue
            expected = _hf_shape(entry, shapes[entry.path])
            if stored_shape != expected:
                raise CheckpointError(f"tensor {name} has shape {stored_shape}, expected {expected}")
            flat[entry.path] = _load_array(file, name, entry, shapes[entry.path], jnp.dtype(dtype),
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


def _atomic_write(target: epath.Path, write) -> None:
    """Writes through a local temporary file, then renames it over `target` (a local path) or copies it to
    `target` (cloud storage, where an object appears whole or not at all): never a half-written file."""
    local = _is_local(target)
    fd, tmp = tempfile.mkstemp(dir=os.fspath(target.parent) if local else None, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(tmp)
        if local:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the export from other users
            os.replace(tmp, os.fspath(target))
        else:
            with open(tmp, "rb") as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, 16 * 2**20)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
        _atomic_write(path / name, lambda tmp, shard=shard: save_file(shard, tmp, metadata=metadata))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": {t: n for n, shard in zip(names, shards) for t in shard}}
        _atomic_write(path / INDEX_FILE, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2)))
    keep = set(names) | ({INDEX_FILE} if len(shards) > 1 else set())
    for old in stale:  # files of an earlier export in another layout
        if old.name not in keep and old.exists():
            old.unlink()
    _atomic_write(path / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config_to_hf(config), indent=2)))
