"""Next-token selection: greedy, or sampling with temperature, top-k, top-p and min-p (the original's order)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


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
        """logits [..., vocab] float32 -> token ids [...] int32."""
        if self.temperature == 0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        probs = jax.nn.softmax(logits / self.temperature, axis=-1)
        if self.top_k is not None:
            kth = jax.lax.top_k(probs, min(self.top_k, probs.shape[-1]))[0][..., -1:]
            probs = jnp.where(probs < kth, 0.0, probs)
        if self.top_p is not None and self.top_p < 1:
            order = jnp.argsort(-probs, axis=-1)
            sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
            # As the original: keep the tokens whose cumulative mass is <= top_p, and always the most likely one.
            keep_sorted = (jnp.cumsum(sorted_probs, axis=-1) <= self.top_p).at[..., 0].set(True)
            keep = jnp.put_along_axis(jnp.zeros_like(keep_sorted), order, keep_sorted, axis=-1, inplace=False)
            probs = jnp.where(keep, probs, 0.0)
        if self.min_p is not None:
            probs = jnp.where(probs < self.min_p * jnp.max(probs, axis=-1, keepdims=True), 0.0, probs)
        return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)
