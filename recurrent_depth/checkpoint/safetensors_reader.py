"""Tensors of .safetensors files read into (sharded) jax Arrays, each stored byte read at most once per host.

A device's shard of a parameter is often a column slice of the stored rows (FSDP shards the input axis of a
kernel stored [out, in]), so reading each shard on its own reads those rows once per device.  `load_array` reads
the union of the rows that this host's devices need, in blocks of consecutive rows of at most CHUNK_BYTES (one
read each), and cuts every device's part out of each block in memory.

Format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, the data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from recurrent_depth.errors import CheckpointError
from recurrent_depth.runtime.paths import is_url

# safetensors dtype names -> numpy dtypes (bfloat16 from ml_dtypes, as jax uses).
ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16, "I64": np.int64,
             "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
CHUNK_BYTES = 64 * 2**20  # most bytes one read brings to the host (a block of rows; at least one row)


class SafetensorsFile:
    """The tensors of one .safetensors file.  As a context manager it holds the file open: a memory map for a
    local file, one handle for ranged reads of a remote one (gs://), so that reads in file order stream."""

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
        data_bytes = None if is_url(path) else os.path.getsize(os.fspath(path)) - self.data_start
        for name, info in header.items():
            if info.get("dtype") not in ST_DTYPES:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
            dtype, shape, (start, end) = np.dtype(ST_DTYPES[info["dtype"]]), tuple(info["shape"]), info["data_offsets"]
            if end - start != math.prod(shape) * dtype.itemsize or (data_bytes is not None and end > data_bytes):
                raise CheckpointError(f"{path}: tensor {name} has data offsets {[start, end]} that do not fit its "
                                      f"shape {list(shape)} and dtype {info['dtype']} or the file (truncated?)")
            self.tensors[name] = (dtype, shape, start)
        self._mmap = self._file = None

    def __enter__(self) -> SafetensorsFile:
        if is_url(self.path):
            self._file = self.path.open("rb")
        else:
            self._mmap = np.memmap(os.fspath(self.path), np.uint8, mode="r")
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()
        self._mmap = self._file = None

    def read_range(self, start: int, length: int) -> np.ndarray:
        """Bytes [start, start + length) of the data (after the header) as uint8: a view of the memory map, or
        one ranged read of the remote file."""
        start += self.data_start
        if self._mmap is None and self._file is None:
            raise RuntimeError(f"{self.path} is not open: read inside `with SafetensorsFile(...)`")
        if self._mmap is not None:
            data = self._mmap[start:start + length]
        else:
            self._file.seek(start)
            data = np.frombuffer(self._file.read(length), np.uint8)
        if len(data) != length:
            raise CheckpointError(f"{self.path}: {len(data)} bytes at offset {start}, expected {length} (truncated?)")
        return data


def _flat(ranges: list[np.ndarray], dims: tuple[int, ...]) -> np.ndarray:
    """C-order flat indices over the product of per-axis index ranges (ascending when each range is)."""
    if not ranges:
        return np.zeros(1, np.int64)
    return np.ravel_multi_index(np.meshgrid(*ranges, indexing="ij"), dims).ravel()


def _as_slice(indices: np.ndarray) -> np.ndarray | slice:
    """A run of consecutive indices as a slice (a view, not a gather); others as they are."""
    if len(indices) and indices[-1] - indices[0] == len(indices) - 1:
        return slice(int(indices[0]), int(indices[-1]) + 1)
    return indices


@dataclasses.dataclass
class _Part:
    """One distinct shard of a tensor: the stored rows (ascending) and columns it covers, and the host buffer it
    is assembled in: [rows, cols], or [cols, rows] for a kernel (the stored [out, in] transposed)."""
    shape: tuple[int, ...]
    rows: np.ndarray
    cols: np.ndarray | slice
    transposed: bool
    buffer: np.ndarray
    devices: list = dataclasses.field(default_factory=list)
    filled: int = 0

    def fill(self, block: np.ndarray, lo: int) -> None:
        """Copies (and converts) this part's cells of `block`, the stored rows [lo, lo + len(block))."""
        a, b = np.searchsorted(self.rows, [lo, lo + len(block)])
        if a == b:
            return
        piece = block[_as_slice(self.rows[a:b] - lo)][:, self.cols]
        if self.transposed:
            self.buffer[:, a:b] = piece.T
        else:
            self.buffer[a:b] = piece
        self.filled += b - a


def _plan(index: tuple[slice, ...], shape: tuple[int, ...], n_in: int | None, dtype) -> _Part:
    """The part of a tensor of `shape` at `index`.  A kernel [in..., out...] (`n_in` input axes) is stored as
    [out, in]: its part needs the stored rows of its output units and the columns of its inputs.  Other tensors
    are stored reshapes that keep the leading axis (1-D ones are read as one row)."""
    ranges = [np.arange(dim)[s] for dim, s in zip(shape, index)]
    part_shape = tuple(len(r) for r in ranges)
    if n_in is not None:
        rows, cols = _flat(ranges[n_in:], shape[n_in:]), _flat(ranges[:n_in], shape[:n_in])
    elif len(shape) <= 1:
        rows, cols = np.zeros(1, np.int64), _flat(ranges, shape)
    else:
        rows, cols = ranges[0], _flat(ranges[1:], shape[1:])
    buffer = np.empty((len(cols), len(rows)) if n_in is not None else (len(rows), len(cols)), dtype)
    return _Part(part_shape, rows, _as_slice(cols), n_in is not None, buffer)


def load_array(file: SafetensorsFile, name: str, shape: tuple[int, ...], n_in: int | None, dtype,
               sharding=None) -> jax.Array:
    """The stored tensor `name` of the open `file` as an array of `shape` in `dtype` (a kernel [in..., out...]
    when `n_in` is given, the stored [out, in] transposed; else a reshape), its shards on this host's devices of
    `sharding` (None: uncommitted on the default device).  Each stored row some local device needs is read once;
    the host holds one block of rows and the local shards being assembled, never more of the file."""
    if sharding is None:
        index_map = {None: (slice(None),) * len(shape)}
    else:
        index_map = sharding.addressable_devices_indices_map(tuple(shape))
    parts = {}
    for device, index in index_map.items():
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        key = tuple(s.indices(dim) for s, dim in zip(index, shape))
        if key not in parts:  # replicas share one part
            parts[key] = _plan(index, shape, n_in, dtype)
        parts[key].devices.append(device)
    stored_dtype, stored_shape, offset = file.tensors[name]
    num_cols = math.prod(stored_shape[1:]) if len(stored_shape) > 1 else math.prod(stored_shape)
    row_bytes = num_cols * stored_dtype.itemsize
    chunk_rows = max(1, CHUNK_BYTES // max(row_bytes, 1))
    placed, pending = {}, list(parts.values())

    def place_complete_parts():  # a complete part leaves the host at once
        for part in pending:
            if part.filled == len(part.rows):
                value = part.buffer.reshape(part.shape)
                placed.update({d: jnp.asarray(value) if d is None else jax.device_put(value, d) for d in part.devices})
                part.buffer = None
        return [p for p in pending if p.buffer is not None]

    rows = np.unique(np.concatenate([p.rows for p in pending]))
    pending = place_complete_parts()  # (empty ones)
    for run in np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1) if len(rows) else []:
        for lo in range(int(run[0]), int(run[-1]) + 1, chunk_rows):
            hi = min(lo + chunk_rows, int(run[-1]) + 1)
            raw = file.read_range(offset + lo * row_bytes, (hi - lo) * row_bytes)
            block = raw.view(stored_dtype).reshape(hi - lo, num_cols)
            for part in pending:
                part.fill(block, lo)
            pending = place_complete_parts()
    if sharding is None:
        return placed[None]
    return jax.make_array_from_single_device_arrays(tuple(shape), sharding, [placed[d] for d in index_map])
