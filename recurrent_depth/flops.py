"""FLOP counts that know the recurrence, and the machine's measured matmul peak, for MFU.

Convention (as PaLM's MFU): matmul FLOPs only, attention scores counted in full (no causal discount),
rematerialisation not counted; a backward pass costs twice its forward.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from recurrent_depth.config import ModelConfig


def layer_flops(config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one sandwich block."""
    h, i = config.hidden_size, config.intermediate_size
    projections = 2 * h * 3 * h + 2 * h * h + 2 * h * 2 * i + 2 * i * h
    attention = 2 * 2 * seq_len * h  # q k^T and p v
    return float(projections + attention)


def iteration_flops(config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one recurrence: the adapter (2h -> h) and the core layers."""
    return 2 * 2 * config.hidden_size**2 + config.num_core_layers * layer_flops(config, seq_len)


def outer_flops(config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token outside the recurrence: prelude, coda and head."""
    layers = config.num_prelude_layers + config.num_coda_layers
    return layers * layer_flops(config, seq_len) + 2 * config.hidden_size * config.vocab_size


def forward_flops_per_token(config: ModelConfig, seq_len: int, num_steps: int) -> float:
    return outer_flops(config, seq_len) + num_steps * iteration_flops(config, seq_len)


def train_flops_per_token(config: ModelConfig, seq_len: int, n: int, k: int) -> float:
    """n no-gradient iterations cost a forward pass; prelude, coda and the k gradient iterations forward + backward."""
    return 3 * (outer_flops(config, seq_len) + k * iteration_flops(config, seq_len)) + n * iteration_flops(config, seq_len)


def measure_matmul_peak(size: int = 2048, dtype=jnp.float32, repeats: int = 5, device=None) -> float:
    """FLOP/s of the best of `repeats` timed [size, size] matmuls on one device (a practical peak)."""
    device = device or jax.devices()[0]
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
