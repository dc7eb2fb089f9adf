"""Adaptive per-token exit: the original's six criteria, each sequence judged on its own after an iteration.

Values compare successive checks (the "previous" value starts as in the original: entropy 100, a uniform
distribution, the initial state, no argmax).  Logit criteria read the last position of the chunk; latent
criteria average over its real positions.  A sequence exits when the value is below the threshold (at least
the threshold for argmax-stability).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# The original's "auto" thresholds.
DEFAULT_THRESHOLDS = {"entropy-diff": 1e-3, "latent-diff": 0.03, "kl": 1e-3, "minp-kl": 1e-5,
                      "argmax-stability": 5, "cosine": 1e-3}
LOGIT_CRITERIA = ("entropy-diff", "kl", "minp-kl", "argmax-stability")


CRITERIA = tuple(DEFAULT_THRESHOLDS)  # a row's criterion as an array: 0 fixed depth, 1 + the index here


def criterion_id(name: str | None) -> int:
    """The criterion's number in per-row settings arrays: 0 for None (fixed depth), else 1 + CRITERIA.index."""
    return 0 if name is None else 1 + CRITERIA.index(name)


@dataclasses.dataclass(frozen=True)
class ExitCriterion:
    """A named criterion with its threshold; name None never exits early (fixed depth)."""

    name: str | None = None
    threshold: float = 0.0

    @classmethod
    def make(cls, name: str | None, threshold: float | None = None) -> ExitCriterion:
        if name is None:
            return cls()
        if name not in DEFAULT_THRESHOLDS:
            raise ValueError(f"unknown exit criterion {name!r}; expected None or one of {sorted(DEFAULT_THRESHOLDS)}")
        threshold = DEFAULT_THRESHOLDS[name] if threshold is None else threshold
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
            raise ValueError(f"exit_threshold must be a number or None, got {threshold!r}")
        return cls(name, float(threshold))

    @property
    def needs_logits(self) -> bool:
        return self.name in LOGIT_CRITERIA

    def init(self, state, vocab_size: int):
        """Carry of the criterion before the first check.  state [batch, len, embed] is the initial state."""
        return () if self.name is None else _init(self.name, state, vocab_size)

    def check(self, carry, state, weights, logits):
        """(exit [batch] bool, new carry).  state [batch, len, embed] raw, weights [batch, len] (1 for real
        positions), logits [batch, vocab] of the last position (only for logit criteria)."""
        if self.name is None:
            return jnp.zeros(state.shape[:1], bool), carry
        value, carry = _value(self.name, carry, state, weights, logits)
        return _exits(self.name, value, self.threshold), carry


@dataclasses.dataclass(frozen=True)
class CriterionSet:
    """The criteria one compiled program can evaluate; each row picks its own (or none) and its threshold from
    arrays, so that one compilation serves every mix (`criterion_id` numbers them).  `generate` compiles the set of
    its one criterion, the serving engine all of CRITERIA."""

    names: tuple[str, ...] = CRITERIA

    @property
    def logit_names(self) -> tuple[str, ...]:
        return tuple(n for n in self.names if n in LOGIT_CRITERIA)

    def needs_logits(self, ids):
        """[batch] bool: the row's criterion reads the logits (ids [batch] int32 as `criterion_id`)."""
        return _isin(ids, self.logit_names)

    def init(self, state, vocab_size: int) -> dict:
        """The carries of every criterion of the set (latent-diff and cosine share the previous state)."""
        return {_carry_key(n): _init(n, state, vocab_size) for n in self.names}

    def check(self, carry: dict, ids, thresholds, checking, state, weights, logits=None):
        """(exit [batch] bool, updated carries) for the rows whose criterion needs no logits when logits is None
        (latent criteria), else for the rows of the logit criteria; the other rows never exit here.  ids, thresholds
        [batch]; checking [batch] bool: the rows judged now (a criterion no such row uses is not computed, its
        carry left as it was); the rest as `ExitCriterion.check`."""
        names = [n for n in self.names if (n in LOGIT_CRITERIA) == (logits is not None)]
        exits, updated = jnp.zeros(ids.shape, bool), {}
        for name in names:
            key, mine = _carry_key(name), checking & (ids == criterion_id(name))

            def compute(previous, _, name=name):
                return _value(name, previous, state, weights, logits)

            def skip(previous, latest):  # latest: the shared carry as another criterion may have updated it
                return jnp.zeros(ids.shape, jax.eval_shape(compute, previous, latest)[0].dtype), latest

            value, updated[key] = jax.lax.cond(jnp.any(mine), compute, skip, carry[key], updated.get(key, carry[key]))
            exits = exits | (mine & _exits(name, value, thresholds))
        return exits, updated


def _isin(ids, names):
    hit = jnp.zeros(ids.shape, bool)
    for name in names:
        hit = hit | (ids == criterion_id(name))
    return hit


def _carry_key(name: str) -> str:
    return "state" if name in ("latent-diff", "cosine") else name


def _init(name: str, state, vocab_size: int):
    batch = state.shape[0]
    if name == "entropy-diff":
        return jnp.full((batch,), 100.0, jnp.float32)
    if name in ("kl", "minp-kl"):
        return jnp.full((batch, vocab_size), -jnp.log(float(vocab_size)), jnp.float32)
    if name == "argmax-stability":
        return jnp.full((batch,), -1, jnp.int32), jnp.zeros((batch,), jnp.int32)
    return state.astype(jnp.float32)  # latent-diff, cosine


def _exits(name: str, value, threshold):
    return value >= threshold if name == "argmax-stability" else value < threshold


def _value(name: str, carry, state, weights, logits):
    """(the criterion's value [batch], new carry) after an iteration (see ExitCriterion.check)."""
    if name == "entropy-diff":
        probs = jax.nn.softmax(logits, axis=-1)
        entropy = -jnp.sum(probs * jnp.log(probs + 1e-10), axis=-1)
        return jnp.abs(entropy - carry), entropy
    if name in ("kl", "minp-kl"):
        log_probs = _minp_log_probs(logits) if name == "minp-kl" else jax.nn.log_softmax(logits, axis=-1)
        return jnp.sum(jnp.exp(carry) * (carry - log_probs), axis=-1), log_probs  # KL(previous || current)
    if name == "argmax-stability":
        previous, stable = carry
        current = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        stable = jnp.where(current == previous, stable + 1, 0)
        return stable, (current, stable)
    state = state.astype(jnp.float32)
    norm = jnp.linalg.norm(state, axis=-1)
    if name == "latent-diff":
        values = jnp.linalg.norm(state - carry, axis=-1) / norm
    else:  # cosine: 1 - cos(s_i, s_{i-1})
        values = 1.0 - jnp.sum(state * carry, axis=-1) / norm / jnp.linalg.norm(carry, axis=-1)
    return jnp.sum(jnp.where(weights > 0, values * weights, 0.0), axis=-1) / jnp.sum(weights, axis=-1), state


def _minp_log_probs(logits):
    """Probabilities below 0.1 x the largest set to 1/vocab, renormalised, log (the original's minp-kl)."""
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(probs < 0.1 * jnp.max(probs, axis=-1, keepdims=True), 1.0 / logits.shape[-1], probs)
    return jnp.log(probs / jnp.sum(probs, axis=-1, keepdims=True))
