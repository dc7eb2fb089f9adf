"""Per-step recurrence depth for training: how many core iterations run without (n) and with (k) gradient.

Reference: docs/huginn-reference.md §2.1 (log-normal Poisson draw, truncated backprop) and §2.3 (every data-parallel
rank derives the same draw from (seed, step), so no communication is needed).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["sample_num_steps", "fixed_num_steps", "make_depth_sampler", "DEPTH_KINDS"]

DEPTH_KINDS = ("poisson-lognormal", "fixed")

DepthSampler = Callable[[jax.typing.ArrayLike], tuple[jax.Array, jax.Array]]


def _check_int(name: str, value, *, minimum: int) -> None:
    """Raise ValueError naming `name` unless `value` is an int >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def _check_sigma(sigma) -> None:
    """Raise ValueError unless sigma is a finite real >= 0."""
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")


@functools.partial(jax.jit, static_argnames=("mean_recurrence", "mean_backprop_depth", "sigma"))
def _poisson_lognormal(seed, step, mean_recurrence: int, mean_backprop_depth: int, sigma: float):
    """Jitted draw behind `sample_num_steps` (seed and step traced, so new steps never recompile)."""
    key = jax.random.fold_in(jax.random.key(seed), step)
    normal_key, poisson_key = jax.random.split(key)
    t = max(mean_recurrence - mean_backprop_depth, 0)
    s = mean_backprop_depth
    mu = math.log(t + s) - sigma**2 / 2
    rate = jnp.exp(mu + sigma * jax.random.normal(normal_key, (), jnp.float32))
    r = jax.random.poisson(poisson_key, rate, (), jnp.int32) + 1
    return jnp.maximum(r - s, 0).astype(jnp.int32), jnp.minimum(s, r).astype(jnp.int32)


def sample_num_steps(
    seed: int, step: jax.typing.ArrayLike, mean_recurrence: int, mean_backprop_depth: int, sigma: float = 0.5
) -> tuple[jax.Array, jax.Array]:
    """The paper's (n, k) draw for one training step: r ~ Poisson(exp(N(ln(t+s) - sigma^2/2, sigma))) + 1.

    t = max(mean_recurrence - mean_backprop_depth, 0), s = mean_backprop_depth, so E[r] = max(r̄, k̄) + 1;
    n = max(r - s, 0) iterations without gradient, then k = min(s, r) with gradient (n + k = r).
    Deterministic in (seed, step) via fold_in(key(seed), step); `step` may be traced (int32 scalars returned).
    """
    _check_int("mean_recurrence", mean_recurrence, minimum=1)
    _check_int("mean_backprop_depth", mean_backprop_depth, minimum=0)
    _check_sigma(sigma)
    return _poisson_lognormal(seed, step, int(mean_recurrence), int(mean_backprop_depth), float(sigma))


def fixed_num_steps(n: int, k: int) -> tuple[jax.Array, jax.Array]:
    """Constant (n, k) as int32 scalars, same interface as `sample_num_steps` (e.g. eval: n=32, k=0)."""
    _check_int("n", n, minimum=0)
    _check_int("k", k, minimum=0)
    return jnp.int32(n), jnp.int32(k)


def make_depth_sampler(
    kind: str,
    mean_recurrence: int,
    mean_backprop_depth: int,
    *,
    seed: int = 0,
    sigma: float = 0.5,
    n: int | None = None,
    k: int | None = None,
) -> DepthSampler:
    """Callable step -> (n, k) int32 scalars, usable inside jit with a traced step.

    'poisson-lognormal': `sample_num_steps(seed, step, ...)` (the paper's training scheme);
    'fixed': the given (n, k) every step, by default r = mean_recurrence, i.e. n = max(r̄ - k̄, 0), k = min(k̄, r̄)
    (r̄ = k̄ = 1 is the non-recurrent baseline).
    """
    if kind not in DEPTH_KINDS:
        raise ValueError(f"unknown depth sampler kind {kind!r}; valid kinds: {', '.join(DEPTH_KINDS)}")
    _check_int("mean_recurrence", mean_recurrence, minimum=1)
    _check_int("mean_backprop_depth", mean_backprop_depth, minimum=0)
    _check_int("seed", seed, minimum=0)
    _check_sigma(sigma)
    if kind == "fixed":
        n = max(mean_recurrence - mean_backprop_depth, 0) if n is None else n
        k = min(mean_backprop_depth, mean_recurrence) if k is None else k
        fixed_num_steps(n, k)  # validates
        return lambda step: fixed_num_steps(n, k)
    if n is not None or k is not None:
        raise ValueError(f"n and k are only used by kind='fixed', got n={n!r}, k={k!r} for {kind!r}")
    return functools.partial(
        sample_num_steps,
        seed,
        mean_recurrence=mean_recurrence,
        mean_backprop_depth=mean_backprop_depth,
        sigma=sigma,
    )
