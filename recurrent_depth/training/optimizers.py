"""Optimisation pieces for Huginn training: ELLIS-Adam, weight-decay mask, LR schedules, optimizer factory.

Everything is plain optax so it composes with `optax.chain`, `nnx.Optimizer` and sharded params under `jit`.
Reference: docs/huginn-reference.md §2.4 (optimizer) and §2.5 (clipping, schedule).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "EllisAdamState",
    "ellis_adam",
    "weight_decay_mask",
    "make_schedule",
    "make_optimizer",
    "SCHEDULE_KINDS",
    "OPTIMIZER_NAMES",
]

SCHEDULE_KINDS = ("constant", "cosine", "wsd")
OPTIMIZER_NAMES = ("adamw", "ellis_adam")

# Leaf names that are never weight-decayed (RMSNorm weights and the attention qk bias), as in the original group2.
_NO_DECAY_NAMES = ("scale", "qk_bias")
# Attribute names of variable wrappers (e.g. flax nnx `Param.value`) that are skipped when naming a leaf.
_WRAPPER_ATTRS = ("value", "raw_value")


class EllisAdamState(NamedTuple):
    """State of `ellis_adam`: number of updates done, first and second moments (float32, shaped like params)."""

    count: jax.Array
    mu: Any
    nu: Any


def ellis_adam(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-6,
    weight_decay: float = 4e-5,
    weight_decay_mask: Any = None,
    update_clipping: bool = True,
    atan2: bool = True,
    running_init: bool = True,
    *,
    peak_learning_rate: float | None = None,
    moment_dtype=jnp.float32,
) -> optax.GradientTransformation:
    """The paper's `ELLISAdam` (reference §2.4) as an optax transformation returning `new_params - params`.

    Per tensor, with t = count + 1 and lr_t = schedule(count) (optax convention: the first update sees schedule(0)):
      m <- m + (1-b1)(g-m); v <- b2 v + (1-b2) g^2      (running_init: m=g, v=g^2 before the first update)
      if update_clipping: v <- max(v, eps^2) (stored); eta = lr_t / max(sqrt(mean(g^2/v)), 1)  else eta = lr_t
      eta <- eta / (1 - b1^t)
      theta <- theta * (1 - (lr_t/lr_0) * wd)            (decoupled: scaled by the schedule ratio, not by lr)
      theta <- theta - eta * atan2(m, sqrt(v)/sqrt(1-b2^t))   (atan2=False: m / (sqrt(v)/sqrt(1-b2^t) + eps))
    lr_0 is `learning_rate` when it is a float, else `peak_learning_rate` (required for a schedule).
    `weight_decay_mask` is a pytree of Python bools like params or a callable params -> such a pytree (True = decay);
    None decays everything. `update` needs `params`. `moment_dtype` stores m and v (bfloat16 halves the optimizer
    memory; the update itself is computed in float32).
    """
    if peak_learning_rate is None:
        if callable(learning_rate):
            raise ValueError("peak_learning_rate is required when learning_rate is a schedule")
        peak_learning_rate = learning_rate
    if not callable(learning_rate):
        _check_number("learning_rate", learning_rate, minimum=0.0)
    _check_number("peak_learning_rate", peak_learning_rate, minimum=0.0, strict=True)
    lr_0 = peak_learning_rate
    for name, beta in (("b1", b1), ("b2", b2)):
        _check_number(name, beta, minimum=0.0)
        if not beta < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {beta!r}")
    _check_number("eps", eps, minimum=0.0, strict=True)  # also the v floor of update clipping: 0 would give NaN
    _check_number("weight_decay", weight_decay, minimum=0.0)

    def init_fn(params):
        """Zero moments (running_init overwrites them with the first gradient at the first update)."""
        zeros = lambda p: jnp.zeros(jnp.shape(p), moment_dtype)  # noqa: E731
        return EllisAdamState(
            count=jnp.zeros([], jnp.int32), mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params)
        )

    def update_fn(updates, state, params=None):
        """One ELLIS-Adam step for every tensor independently; returns (updates, new_state)."""
        if params is None:
            raise ValueError("ellis_adam needs params in update() (decoupled weight decay)")
        count = state.count
        t = (count + 1).astype(jnp.float32)
        lr = jnp.asarray(learning_rate(count) if callable(learning_rate) else learning_rate, jnp.float32)
        decay = (lr / lr_0) * weight_decay
        bias_correction1 = 1.0 - b1**t
        bias_correction2_sqrt = jnp.sqrt(1.0 - b2**t)
        if weight_decay_mask is None:
            mask = jax.tree.map(lambda _: True, params)
        else:
            mask = weight_decay_mask(params) if callable(weight_decay_mask) else weight_decay_mask

        def leaf(g, p, m, v, decayed):
            """Update of one tensor; only reductions over this tensor (sharding-friendly)."""
            g, m, v = g.astype(jnp.float32), m.astype(jnp.float32), v.astype(jnp.float32)
            if running_init:
                first = count == 0
                m = jnp.where(first, g, m)
                v = jnp.where(first, g * g, v)
            m = m + (1.0 - b1) * (g - m)
            v = b2 * v + (1.0 - b2) * (g * g)
            step_size = lr
            if update_clipping:
                v = jnp.maximum(v, eps * eps)
                rms = jnp.sqrt(jnp.mean(g * g / v))
                step_size = step_size / jnp.maximum(rms, 1.0)
            step_size = step_size / bias_correction1
            denom = jnp.sqrt(v) / bias_correction2_sqrt
            direction = jnp.arctan2(m, denom) if atan2 else m / (denom + eps)
            p32 = p.astype(jnp.float32)
            delta = -step_size * direction
            if decayed:
                delta = delta - decay * p32
            return delta.astype(p.dtype), m.astype(moment_dtype), v.astype(moment_dtype)

        flat_g, treedef = jax.tree.flatten(updates)
        rest = [treedef.flatten_up_to(x) for x in (params, state.mu, state.nu, mask)]
        out = [leaf(*args) for args in zip(flat_g, *rest)]
        new_updates, mu, nu = (treedef.unflatten([o[i] for o in out]) for i in range(3))
        return new_updates, EllisAdamState(count=optax.safe_increment(count), mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def _leaf_name(path) -> str:
    """Name of a leaf: its last key, skipping variable-wrapper attributes such as nnx `.value`."""
    for entry in reversed(path):
        if isinstance(entry, jax.tree_util.GetAttrKey):
            if entry.name in _WRAPPER_ATTRS:
                continue
            return entry.name
        if isinstance(entry, jax.tree_util.DictKey):
            return str(entry.key)
        if isinstance(entry, jax.tree_util.SequenceKey):
            return str(entry.idx)
        return str(getattr(entry, "key", entry))
    return ""


def weight_decay_mask(params) -> Any:
    """Bools like `params`: False for RMSNorm `scale` and `qk_bias` leaves, True otherwise (embeddings included)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) not in _NO_DECAY_NAMES, params)


def _check_number(name: str, value, *, minimum: float, strict: bool = False) -> None:
    """Raise ValueError naming `name` unless `value` is a finite real >= minimum (> when strict)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value!r}")


def _check_int(name: str, value, *, minimum: int) -> None:
    """Raise ValueError naming `name` unless `value` is an int >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def make_schedule(
    kind: str,
    peak: float,
    warmup_steps: int,
    total_steps: int,
    decay_steps: int | None = None,
    end_value: float = 0.0,
) -> optax.Schedule:
    """Learning-rate schedule: linear warmup 0 -> peak over `warmup_steps`, then by `kind`.

    'constant': stay at peak (the paper's run; its trapezoid cooldown was never reached);
    'cosine': cosine from peak to `end_value` at `total_steps`;
    'wsd': stay at peak, then linear decay to `end_value` over the last `decay_steps` of `total_steps`.
    Value at step s < warmup_steps is peak * s / warmup_steps; past `total_steps` decaying kinds stay at end_value.
    """
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; valid kinds: {', '.join(SCHEDULE_KINDS)}")
    _check_number("peak", peak, minimum=0.0, strict=True)
    _check_int("warmup_steps", warmup_steps, minimum=0)
    _check_int("total_steps", total_steps, minimum=1)
    _check_number("end_value", end_value, minimum=0.0)
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be <= total_steps ({total_steps})")
    if end_value > peak:
        raise ValueError(f"end_value ({end_value}) must be <= peak ({peak})")
    if kind != "wsd" and decay_steps is not None:
        raise ValueError(f"decay_steps is only used by kind='wsd', got decay_steps={decay_steps!r} for {kind!r}")
    if kind == "constant" and end_value != 0.0:
        raise ValueError(f"end_value is not used by kind='constant', got end_value={end_value!r}")

    if kind == "constant":
        after = optax.constant_schedule(peak)
    elif kind == "cosine":
        if total_steps == warmup_steps:
            raise ValueError(f"kind='cosine' needs total_steps > warmup_steps, got {total_steps} and {warmup_steps}")
        after = optax.cosine_decay_schedule(peak, total_steps - warmup_steps, alpha=end_value / peak)
    else:
        if decay_steps is None:
            raise ValueError("kind='wsd' requires decay_steps")
        _check_int("decay_steps", decay_steps, minimum=1)
        if warmup_steps + decay_steps > total_steps:
            raise ValueError(
                f"warmup_steps + decay_steps ({warmup_steps} + {decay_steps}) must be <= total_steps ({total_steps})"
            )
        stable_steps = total_steps - warmup_steps - decay_steps
        after = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, end_value, decay_steps)], [stable_steps]
        )
    if warmup_steps == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), after], [warmup_steps])


def make_optimizer(
    name: str,
    schedule: float | optax.Schedule,
    *,
    peak_learning_rate: float,
    weight_decay: float,
    b1: float,
    b2: float,
    eps: float,
    grad_clip_norm: float | None,
    mask_fn: Callable[[Any], Any] | None = weight_decay_mask,
    moment_dtype=jnp.float32,
) -> optax.GradientTransformation:
    """Global-norm gradient clipping (skipped if `grad_clip_norm` is None or <= 0) followed by the named optimizer.

    'ellis_adam': the paper's optimizer (decay scaled by schedule/peak); 'adamw': `optax.adamw` (decay scaled by lr).
    `mask_fn(params)` selects the decayed leaves (None: decay all); `moment_dtype` stores the first (adamw) or
    both (ellis_adam) moments.
    """
    if name == "ellis_adam":
        opt = ellis_adam(
            schedule,
            b1=b1,
            b2=b2,
            eps=eps,
            weight_decay=weight_decay,
            weight_decay_mask=mask_fn,
            peak_learning_rate=peak_learning_rate,
            moment_dtype=moment_dtype,
        )
    elif name == "adamw":
        opt = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask_fn,
                          mu_dtype=moment_dtype)
    else:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZER_NAMES)}")
    if grad_clip_norm is None or grad_clip_norm <= 0:
        return opt
    return optax.chain(optax.clip_by_global_norm(grad_clip_norm), opt)
