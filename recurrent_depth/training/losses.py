"""Training losses."""

import jax
import jax.numpy as jnp

from recurrent_depth.data.batch import IGNORE_INDEX


def token_losses(logits, labels, z_loss: float):
    """Sums over counted tokens: (cross-entropy + z_loss * logsumexp^2, cross-entropy, count)."""
    valid = labels != IGNORE_INDEX
    lse = jax.nn.logsumexp(logits, axis=-1)
    label_logit = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    ce = jnp.where(valid, lse - label_logit, 0.0).sum()
    total = ce + z_loss * jnp.where(valid, lse**2, 0.0).sum() if z_loss else ce
    return total, ce, valid.sum()


def cross_entropy(logits, labels, z_loss: float = 0.0):
    """Mean token cross-entropy over labels != IGNORE_INDEX, plus optional z-loss (z_loss * mean logsumexp^2).

    logits [batch, seq, vocab] (float32), labels [batch, seq].  Returns (loss, number of counted tokens).
    """
    total, _, count = token_losses(logits.astype(jnp.float32), labels, z_loss)
    return total / jnp.maximum(count, 1), count
