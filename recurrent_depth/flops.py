"""FLOP counts that know the recurrence, and the machine's measured matmul peak, for MFU; the weight bytes a
decoded token reads, and the measured memory bandwidth, for the roofline of memory-bound (small-batch) decoding.

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


def layer_params(config: ModelConfig) -> int:
    """Parameters of one sandwich block: q|k|v, out, gate|up, down, four norms, the q/k biases."""
    h, i = config.hidden_size, config.intermediate_size
    return 3 * h * h + h * h + 2 * h * i + i * h + 4 * h + (2 * h if config.qk_bias else 0)


def decode_weight_bytes(config: ModelConfig, num_steps: int) -> int:
    """Bytes of weights one decoding step reads (whatever the batch): the prelude, the adapter's input half
    once, then per iteration its state half and the core layers, the coda, the final norm and the head (the
    embedding itself is only looked up, one row per token, unless it is tied to the head)."""
    h = config.hidden_size
    iteration = h * h + config.num_core_layers * layer_params(config)
    outer = (config.num_prelude_layers + config.num_coda_layers) * layer_params(config) + h * h + h
    return (outer + num_steps * iteration + h * config.vocab_size) * jnp.dtype(config.weight_dtype).itemsize


def _best_seconds(fn, *args, repeats: int) -> float:
    """The fastest of `repeats` timed calls of the jitted fn, after one compiling call."""
    fn(*args).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best


def measure_memory_bandwidth(mib: int = 256, repeats: int = 10, device=None) -> float:
    """Bytes/s that one device streams through a vector-matrix product over a [4096, n] float32 matrix of `mib`
    MiB, far larger than any cache: the practical bound of decoding at small batch (best of `repeats`)."""
    device = device or jax.devices()[0]
    w = jax.device_put(jnp.ones((4096, mib * 2**20 // (4 * 4096)), jnp.float32), device)
    x = jax.device_put(jnp.ones((1, 4096), jnp.float32), device)
    return w.nbytes / _best_seconds(jax.jit(lambda x, w: x @ w), x, w, repeats=repeats)


def measure_matmul_peak(size: int = 2048, dtype=jnp.float32, repeats: int = 5, device=None) -> float:
    """FLOP/s of the best of `repeats` timed [size, size] matmuls on one device (a practical peak)."""
    a = jax.device_put(jnp.ones((size, size), dtype), device or jax.devices()[0])
    return 2 * size**3 / _best_seconds(jax.jit(lambda x: x @ x), a, repeats=repeats)
