"""Training losses."""

import jax
import jax.numpy as jnp
import optax

IGNORE_INDEX = -100  # label value that does not count in the loss (as in the original)


def cross_entropy(logits, labels, ignore_index: int = IGNORE_INDEX, z_loss: float = 0.0):
    """Mean token cross-entropy over labels != ignore_index, plus optional z-loss (z_loss * mean logsumexp^2).

    logits [batch, seq, vocab] (float32), labels [batch, seq].  Returns (loss, number of counted tokens).
    """
    valid = labels != ignore_index
    count = valid.sum()
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    loss = jnp.sum(jnp.where(valid, ce, 0.0)) / jnp.maximum(count, 1)
    if z_loss:
        lse = jax.nn.logsumexp(logits, axis=-1)
        loss = loss + z_loss * jnp.sum(jnp.where(valid, lse**2, 0.0)) / jnp.maximum(count, 1)
    return loss, count

