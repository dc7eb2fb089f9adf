"""Next-token selection: greedy, or sampling with temperature, top-k, top-p and min-p (the original's order).

`Sampler` is one setting for a whole batch, drawn with one key; `SamplingRows` gives every row its own setting and
key (what `generate` compiles, broadcasting its Sampler, and what the serving engine's slots hold); both filter
through the same function.
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Sampler:
    """temperature 0 is greedy (argmax); the filters are off when None."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and not (isinstance(self.top_k, int) and self.top_k >= 1):
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] or be None, got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must lie in [0, 1] or be None, got {self.min_p}")

    def __call__(self, logits, key):
        """logits [..., vocab] float32 -> token ids [...] int32, all drawn with one key."""
        if self.temperature == 0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        log_probs = filtered_log_probs(logits / self.temperature, self.top_k, self.top_p, self.min_p)
        return jax.random.categorical(key, log_probs, axis=-1).astype(jnp.int32)

    def rows(self, batch: int) -> SamplingRows:
        """This setting for each of `batch` rows (numpy arrays)."""
        return SamplingRows.of(batch, self.temperature, self.top_k, self.top_p, self.min_p)


@flax.struct.dataclass
class SamplingRows:
    """One sampling setting per row [batch]; the off values leave a filter out."""

    temperature: jax.Array  # float32; 0: greedy
    top_k: jax.Array  # int32; 0: off
    top_p: jax.Array  # float32; 1: off
    min_p: jax.Array  # float32; 0: off

    @classmethod
    def of(cls, batch: int, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           min_p: float | None = None) -> SamplingRows:
        """`batch` rows of one setting (None: off), as numpy arrays."""
        full = lambda value, dtype: np.full((batch,), value, dtype)  # noqa: E731
        return cls(temperature=full(temperature, np.float32), top_k=full(top_k or 0, np.int32),
                   top_p=full(1.0 if top_p is None else top_p, np.float32),
                   min_p=full(min_p or 0.0, np.float32))

    def __call__(self, logits, keys, like: Sampler | None = None):
        """Each row's token [batch] int32 from logits [batch, vocab] float32 with its own setting and key
        (keys [batch]).  like: a Sampler that every row's setting follows (generate), so that what it leaves out
        compiles to nothing; None: any mix (serving)."""
        greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if like is not None and like.temperature == 0:
            return greedy
        uses = lambda field: like is None or getattr(like, field) is not None  # noqa: E731
        temperature = self.temperature[:, None]

        def sample(sort: bool):
            log_probs = filtered_log_probs(logits / jnp.where(temperature > 0, temperature, 1.0),
                                           self.top_k[:, None] if sort and uses("top_k") else None,
                                           self.top_p[:, None] if sort and uses("top_p") else None,
                                           self.min_p[:, None] if uses("min_p") else None)
            return jax.vmap(lambda key, lp: jax.random.categorical(key, lp).astype(jnp.int32))(keys, log_probs)

        if like is None:  # any mix (serving): skip the draw when every row is greedy, the sort when no row filters
            sorts = jnp.any((self.top_k > 0) | (self.top_p < 1))
            sampled = jax.lax.cond(jnp.any(self.temperature > 0),
                                   lambda: jax.lax.cond(sorts, lambda: sample(True), lambda: sample(False)),
                                   lambda: greedy)
        else:
            sampled = sample(True)
        return jnp.where(self.temperature > 0, sampled, greedy)


def filtered_log_probs(logits, top_k=None, top_p=None, min_p=None):
    """log of softmax(logits) [..., vocab] after the top-k, top-p and min-p filters (-inf where filtered).

    Each filter is None (off) or an array broadcasting against [..., 1]: top_k (0: off), top_p (1: off), min_p
    (0: off)."""
    probs = jax.nn.softmax(logits, axis=-1)
    if top_k is not None or top_p is not None:
        order = jnp.argsort(-probs, axis=-1)
        sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
    if top_k is not None:
        k = jnp.asarray(top_k)
        kth = jnp.take_along_axis(sorted_probs, jnp.broadcast_to(jnp.clip(k - 1, 0, probs.shape[-1] - 1),
                                                                 (*probs.shape[:-1], 1)), axis=-1)
        probs = jnp.where((k > 0) & (probs < kth), 0.0, probs)
        sorted_probs = jnp.where((k > 0) & (sorted_probs < kth), 0.0, sorted_probs)  # sorted still
    if top_p is not None:
        # As the original: keep the tokens whose cumulative mass is <= top_p, and always the most likely one.
        keep_sorted = (jnp.cumsum(sorted_probs, axis=-1) <= top_p).at[..., 0].set(True)
        keep = jnp.put_along_axis(jnp.zeros_like(keep_sorted), order, keep_sorted, axis=-1, inplace=False)
        probs = jnp.where(keep | (jnp.asarray(top_p) >= 1), probs, 0.0)
    if min_p is not None:
        probs = jnp.where(probs < min_p * jnp.max(probs, axis=-1, keepdims=True), 0.0, probs)
    return jnp.log(probs)
