"""Device mesh and logical-axis sharding rules.

The model names its parameter axes (`vocab`, `embed`, `heads`, `kv`, `mlp`, `norm`) and activation axes
(`batch`, `length`, `act_embed`, `act_heads`, `act_mlp`, `act_vocab`); a rules table maps them onto the mesh axes
`data`, `fsdp`, `tensor`.  The default: FSDP over `embed`, tensor parallelism over heads/mlp/vocab, batch over
data+fsdp.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """(data, fsdp, tensor) with at most one -1 standing for the rest of the devices."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape must give sizes for {MESH_AXES}, got {shape}")
    if any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
        raise ValueError(f"mesh sizes must be positive, with at most one -1 (the rest), got {shape}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh {shape}: {num_devices} devices are not divisible by {known}")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                         f"but {num_devices} are available")
    return shape


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types (GSPMD-style, as the logical rules need)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = resolve_mesh_shape(shape, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def rules_from_config(rules) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """Normalises a rules table from a config (lists become tuples) and checks the mesh axis names."""
    out = []
    for entry in rules:
        name, axes = entry
        axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
        for axis in (axes if isinstance(axes, tuple) else (axes,)):
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(f"sharding rule {name!r} -> {axes!r}: unknown mesh axis {axis!r} "
                                 f"(mesh axes: {MESH_AXES})")
        out.append((name, axes))
    return tuple(out)


def logical_shardings(boxed_tree, mesh: Mesh, rules):
    """NamedShardings for a tree of parameters boxed with logical axis names (e.g. `jax.eval_shape(init)`)."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, rules)


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, seq, ...] input array: batch over the mesh axes the `batch` rule names."""
    spec = nn.logical_to_mesh_axes(("batch",) + ("length",) + (None,) * (ndim - 2), rules)
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_rows(sharding: NamedSharding, batch_size: int) -> list[int]:
    """The rows of a [batch, ...] array that this process's devices hold, in order: what it reads.  Processes
    whose devices hold the same rows (replicas along non-batch mesh axes) read the same rows."""
    held = sharding.addressable_devices_indices_map((batch_size, 1))
    return sorted({r for index in held.values() for r in range(*index[0].indices(batch_size))})


def global_batch(local_batch: dict, sharding: NamedSharding, rows: Sequence[int], batch_size: int) -> dict:
    """Global [batch_size, ...] arrays from this process's `rows` (batch_rows, in order) of the batch; on one
    process a plain device_put."""
    if jax.process_count() == 1:
        return jax.device_put(local_batch, sharding)
    position = {r: i for i, r in enumerate(rows)}

    def array(x):
        x = np.asarray(x)

        def part(index):  # a device's slice of the global array, from the rows this process read
            lo, hi, _ = index[0].indices(batch_size)
            return x[position[lo]:position[lo] + hi - lo][(slice(None), *index[1:])]

        return jax.make_array_from_callback((batch_size, *x.shape[1:]), sharding, part)

    return jax.tree.map(array, local_batch)
