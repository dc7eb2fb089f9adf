"""A learnable synthetic sequence task for smoke tests and benchmarks (no data download).

Each row is an arithmetic progression modulo the vocabulary: x[t+1] = (x[t] + stride) mod vocab, with a random
start and a stride from a small set.  After two tokens the rest is predictable, so the loss of a working model
falls well below log(vocab).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def progression_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int, step: int,
                      num_strides: int = 8) -> dict:
    """Batch `step` of the task: {inputs, labels} int32 [batch, seq_len], a pure function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    start = rng.integers(0, vocab_size, (batch_size, 1))
    stride = rng.integers(1, num_strides + 1, (batch_size, 1))
    tokens = (start + stride * np.arange(seq_len + 1)) % vocab_size
    return {"inputs": tokens[:, :-1].astype(np.int32), "labels": tokens[:, 1:].astype(np.int32)}


def progression_batches(batch_size: int, seq_len: int, vocab_size: int, seed: int,
                        start_step: int = 0) -> Iterator[dict]:
    """Batches start_step, start_step + 1, ... of the task."""
    step = start_step
    while True:
        yield progression_batch(batch_size, seq_len, vocab_size, seed, step)
        step += 1
