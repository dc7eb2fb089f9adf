"""Preallocated KV cache for compiled decoding, with the original's ways of keeping core-block entries.

The recurrence calls each core layer once per iteration, so one token makes `num_steps * core_layers` core-layer
calls, numbered t = iteration * core_layers + layer.  The cache keeps one entry per prelude layer, per coda layer
and per core *slot* for every position; `CacheStrategy` maps calls to slots and decides what a call reads for a
position that has no entry in its slot (a position whose token exited earlier):

* `full`: slot t for every call (memory grows with the iterations); a missing entry is left out of attention.
* `compress-K`: a ring of K slots, slot t mod K (K = core_layers keeps only each layer's last iteration).
* `latest` (alone or as `latest-compress-K`): a missing entry is read from the position's deepest earlier entry
  for the same core layer (slots s, s - core_layers, s - 2 core_layers, ...: the largest one that is filled).

The original's names are accepted as aliases: `compress-sK`, `latest-m4`, `available-m4`, `latest-m4-compress-sK`
(the original hard-codes 4 core layers in `m4`; here the model's core-layer count is used).

A forward pass processes a `Chunk` of consecutive positions per row (the prompt, one token, or a speculative
block).  Each attention call first stores the chunk's keys/values in its entry (rows that are not active,
having finished or exited, store nothing), then reads every valid entry up to its own position, like the
original's cache.update.  Keys are kept as [.., head_dim, len] and values as [.., len, head_dim], the layouts
the two attention products read without a transposed copy.
"""

from __future__ import annotations

import dataclasses
import math
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np

from recurrent_depth.model.config import ModelConfig
from recurrent_depth.model.layers import constrain

_STRATEGY = re.compile(r"(?P<latest>latest|available)(?:-m4)?(?:-compress-s?(?P<ring>\d+))?|compress-s?(?P<slots>\d+)")


@dataclasses.dataclass(frozen=True)
class CacheStrategy:
    """How core-layer calls share cache slots.  slots: ring size K, or None for one slot per call."""

    slots: int | None = None
    latest: bool = False

    @classmethod
    def parse(cls, name: str) -> CacheStrategy:
        """`full`, `compress-K`, `latest`, `latest-compress-K` (and the original's spellings, see the module)."""
        if name == "full":
            return cls()
        match = _STRATEGY.fullmatch(name) if isinstance(name, str) else None
        if match is None:
            raise ValueError(f"unknown cache strategy {name!r}; expected 'full', 'compress-K', 'latest' or "
                             f"'latest-compress-K' (also the original's 'compress-sK', 'latest-m4', "
                             f"'latest-m4-compress-sK')")
        digits = match["ring"] or match["slots"]
        slots = int(digits) if digits else None
        if slots is not None and slots < 1:
            raise ValueError(f"cache strategy {name!r}: the number of slots must be positive")
        return cls(slots=slots, latest=bool(match["latest"]))

    def num_slots(self, num_steps: int, core_layers: int) -> int:
        return num_steps * core_layers if self.slots is None else self.slots


@flax.struct.dataclass
class Chunk:
    """Positions one forward pass processes: `length` consecutive buffer positions per row from `start`."""

    start: jax.Array  # [batch] int32: buffer index of the chunk's first position
    real: jax.Array  # [batch, length] bool: a real token (False: padding, never stored)
    # Attention reads buffer positions [0, span) only (None: all max_len); the chunk must lie below it.  The serving
    # engine decodes short requests in a long buffer this way, at the cost of the positions they use.
    span: int | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def positions(self):  # [batch, length] buffer indices
        return self.start[:, None] + jnp.arange(self.real.shape[1], dtype=jnp.int32)


@flax.struct.dataclass
class KVGroup:
    """The entries of one group of layers (prelude layers, core slots or coda layers) for every position."""

    k: jax.Array  # [entries, batch, heads, head_dim, max_len]
    v: jax.Array  # [entries, batch, heads, max_len, head_dim]
    valid: jax.Array  # [entries, batch, max_len] bool: the entry holds this position's keys/values

    @classmethod
    def create(cls, config: ModelConfig, entries: int, batch: int, max_len: int) -> KVGroup:
        heads, dim, dtype = config.num_heads, config.resolved_head_dim, config.compute_dtype
        return cls(k=constrain(jnp.zeros((entries, batch, heads, dim, max_len), dtype),
                               (None, "batch", "act_heads", None, "length")),
                   v=constrain(jnp.zeros((entries, batch, heads, max_len, dim), dtype),
                               (None, "batch", "act_heads", "length", None)),
                   valid=jnp.zeros((entries, batch, max_len), bool))


@flax.struct.dataclass
class KVCursor:
    """A group's entries during one pass, positioned at one layer's entry (implements layers.KVStore)."""

    group: KVGroup  # its validity already marks the chunk's entries of every layer of the pass
    entry: jax.Array | int  # the current layer's entry: an int where it is known at trace time (a static slice)
    write: jax.Array  # [batch, length] int32: where the chunk's positions are stored (max_len: not stored)
    causal: jax.Array  # [batch, length, span] bool: entry position <= the chunk position
    ring: int | None = flax.struct.field(pytree_node=False, default=None)  # entries wrap modulo ring
    latest: int | None = flax.struct.field(pytree_node=False, default=None)  # fallback stride (core layers)

    def advance(self) -> KVCursor:
        """The next layer's entry."""
        entry = self.entry + 1
        return self.replace(entry=entry if self.ring is None else entry % self.ring)

    def attend(self, k, v):
        """Stores k, v [batch, length, heads, head_dim] at the current entry, then returns what attention
        reads: keys [b, h, d, span], values [b, h, span, d], mask [b, 1, length, span], and self."""
        g, e, span = self.group, self.entry, self.causal.shape[-1]
        rows = jnp.arange(k.shape[0])[:, None]
        group = g.replace(k=g.k.at[e, rows, :, :, self.write].set(k.astype(g.k.dtype), mode="drop"),
                          v=g.v.at[e, rows, :, self.write].set(v.astype(g.v.dtype), mode="drop"))
        count = 1 if self.latest is None else math.ceil(group.valid.shape[0] / self.latest)
        if count == 1:  # no earlier entry of this layer to fall back to (as latest-compress-K with K = core layers)
            keys, values, ok = group.k[e, ..., :span], group.v[e, :, :, :span], group.valid[e, :, :span]
        else:  # a missing entry falls back to the deepest earlier one of the same layer: e, e - L, e - 2L, ...
            candidates = e - self.latest * jnp.arange(count)
            found = (group.valid[jnp.maximum(candidates, 0), :, :span]
                     & (candidates >= 0)[:, None, None])  # [count, b, span]
            source = candidates[jnp.argmax(found, axis=0)]  # [batch, span]: the first (deepest) valid one
            cols = jnp.arange(source.shape[1])[None, :]
            keys = jnp.transpose(group.k[source, rows, :, :, cols], (0, 2, 3, 1))  # [b, len, h, d] -> [b, h, d, len]
            values = jnp.transpose(group.v[source, rows, :, cols], (0, 2, 1, 3))  # [b, len, h, d] -> [b, h, len, d]
            ok = jnp.any(found, axis=0)
        return keys, values, (ok[:, None, :] & self.causal)[:, None], self.replace(group=group)


@flax.struct.dataclass
class KVCache:
    """Keys/values (after RoPE) of every processed position: prelude layers, core slots, coda layers."""

    prelude: KVGroup  # entries: prelude layers
    core: KVGroup  # entries: strategy.num_slots(num_steps, core_layers)
    coda: KVGroup  # entries: coda layers
    strategy: CacheStrategy = flax.struct.field(pytree_node=False)
    core_layers: int = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, config: ModelConfig, batch: int, max_len: int, strategy: CacheStrategy, num_steps: int):
        """An empty cache for `batch` rows of `max_len` positions, for up to `num_steps` iterations per token."""
        return cls(prelude=KVGroup.create(config, config.num_prelude_layers, batch, max_len),
                   core=KVGroup.create(config, strategy.num_slots(num_steps, config.num_core_layers), batch, max_len),
                   coda=KVGroup.create(config, config.num_coda_layers, batch, max_len),
                   strategy=strategy, core_layers=config.num_core_layers)

    @staticmethod
    def nbytes_for(config: ModelConfig, batch: int, max_len: int, strategy: CacheStrategy, num_steps: int) -> int:
        """Bytes of the keys/values (the validity masks are negligible)."""
        entries = (config.num_prelude_layers + config.num_coda_layers
                   + strategy.num_slots(num_steps, config.num_core_layers))
        return 2 * entries * batch * max_len * config.hidden_size * np.dtype(config.compute_dtype).itemsize

    @property
    def max_len(self) -> int:
        return self.prelude.valid.shape[-1]

    def _cursor(self, group: KVGroup, chunk: Chunk, active, entries, **static) -> KVCursor:
        """A cursor at entries[0] whose group already marks the chunk valid in all `entries` [layers]."""
        write = jnp.where(chunk.real & active[:, None], chunk.positions, self.max_len)  # [batch, length]
        valid = group.valid.at[entries[:, None, None], jnp.arange(write.shape[0])[None, :, None], write[None]]
        span = self.max_len if chunk.span is None else min(chunk.span, self.max_len)
        causal = jnp.arange(span)[None, None, :] <= chunk.positions[:, :, None]
        first = int(entries[0]) if isinstance(entries, np.ndarray) else entries[0]
        return KVCursor(group.replace(valid=valid.set(True, mode="drop")), first, write, causal, **static)

    def prelude_cursor(self, chunk: Chunk, active) -> KVCursor:
        """At the first prelude layer; `active` [batch]: rows that store entries."""
        return self._cursor(self.prelude, chunk, active, np.arange(self.prelude.k.shape[0]))

    def coda_cursor(self, chunk: Chunk, active) -> KVCursor:
        return self._cursor(self.coda, chunk, active, np.arange(self.coda.k.shape[0]))

    def core_cursor(self, chunk: Chunk, active, iteration) -> KVCursor:
        """At the first core layer of `iteration` (traced).  Where the ring's size divides the core layers (as
        `latest-compress-4` for 4 core layers), layer l's entry is l mod ring at every iteration: known at trace
        time, so attention reads a static slice of the cache rather than a copy of a dynamic one."""
        layers, ring = np.arange(self.core_layers), self.strategy.slots
        if ring is not None and self.core_layers % ring == 0:
            entries = layers % ring
        else:
            entries = iteration * self.core_layers + jnp.asarray(layers)
            entries = entries if ring is None else entries % ring
        return self._cursor(self.core, chunk, active, entries, ring=ring,
                            latest=self.core_layers if self.strategy.latest else None)

    def insert(self, other: KVCache, rows) -> KVCache:
        """This cache with its rows `rows` [n] (traced; out of range: skipped) replaced by `other`'s n rows: other's
        entries at positions [0, other.max_len), none beyond (the serving engine puts prefilled prompts into slots
        this way)."""
        def put(big: KVGroup, small: KVGroup) -> KVGroup:
            n, length = small.valid.shape[1:]
            valid = jnp.zeros((big.valid.shape[0], n, self.max_len), bool).at[..., :length].set(small.valid)
            return big.replace(k=big.k.at[:, rows, ..., :length].set(small.k.astype(big.k.dtype), mode="drop"),
                               v=big.v.at[:, rows, :, :length].set(small.v.astype(big.v.dtype), mode="drop"),
                               valid=big.valid.at[:, rows].set(valid, mode="drop"))

        return self.replace(prelude=put(self.prelude, other.prelude), core=put(self.core, other.core),
                            coda=put(self.coda, other.coda))

    def truncate(self, lengths) -> KVCache:
        """Forgets every entry at buffer positions >= lengths [batch] (rejected speculative tokens)."""
        keep = jnp.arange(self.max_len)[None, :] < lengths[:, None]
        forget = lambda g: g.replace(valid=g.valid & keep[None])  # noqa: E731
        return self.replace(prelude=forget(self.prelude), core=forget(self.core), coda=forget(self.coda))
