"""FLOP counts that know the recurrence, chips' peaks, and the machine's measured matmul peak, for MFU and HFU; the
weight bytes a decoded token reads, and the measured memory bandwidth, for the roofline of memory-bound
(small-batch) decoding.

Convention (as PaLM's MFU): matmul FLOPs only, attention scores counted in full (no causal discount) in model
FLOPs, and in hardware FLOPs as far as the attention implementation computes them (the xla and splash kernels skip
key blocks after the query block: `score_fraction`); a backward pass costs twice its forward.  The adapter's input
half is applied once per forward pass (see CoreBlock.inject), so an iteration costs its state half and the core
layers.  *Model* FLOPs count what the math needs; *hardware*
FLOPs also what the train step really runs: all `mean_backprop_depth` gradient iterations (a traced k masks the
first ones but computes them) and the forward that rematerialisation recomputes in the backward pass.
"""

from __future__ import annotations

import time
import warnings

import jax
import jax.numpy as jnp

from recurrent_depth.model.attention import causal_blocks
from recurrent_depth.model.config import ModelConfig

# Dense bfloat16 peak FLOP/s of one JAX device, by `device_kind` (lower case, first match wins).  Vendors' figures:
# TPU v4 275T, v5e 197T, v5p 459T, v6e (Trillium) 918T; A100 312T; H100 / H200 SXM 989T, H100 PCIe 756T; an AMD
# MI250X is two devices (GCDs) of 191.5T each.
PEAK_BF16_FLOPS = (
    ("tpu v6 lite", 918e12), ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12), ("tpu v5e", 197e12),
    ("tpu v5p", 459e12), ("tpu v5", 459e12),
    ("tpu v4", 275e12),
    ("a100", 312e12),
    ("h100 pcie", 756e12), ("h100", 989e12), ("h200", 989e12),
    ("mi250x", 191.5e12),
)


def chip_peak_flops(device_kind: str) -> float | None:
    """The table's bf16 peak for a `device_kind` (e.g. "TPU v5 lite", "NVIDIA H100 80GB HBM3"), None if unknown."""
    kind = device_kind.lower()
    return next((peak for name, peak in PEAK_BF16_FLOPS if name in kind), None)


def peak_flops(device=None, dtype=jnp.float32) -> float:
    """Peak FLOP/s of one device for MFU: the chip's bf16 peak from the table; on CPU, or for a chip not in the
    table (with a warning), a measured `dtype` matmul."""
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        peak = chip_peak_flops(device.device_kind)
        if peak is not None:
            return peak
        warnings.warn(f"no peak FLOP/s known for {device.device_kind!r}; MFU is against a measured matmul "
                      "(set train.peak_flops for the chip's peak)", stacklevel=2)
    return measure_matmul_peak(dtype=dtype, device=device)


def _projection_flops(config: ModelConfig) -> dict[str, float]:
    """Forward FLOPs per token of each weight matmul of a sandwich block."""
    h, i = config.hidden_size, config.intermediate_size
    return {"qkv": 2 * h * 3 * h, "out": 2 * h * h, "fc": 2 * h * 2 * i, "proj": 2 * i * h}


def score_fraction(config: ModelConfig, seq_len: int) -> float:
    """The share of the full [seq, seq] score square that causal self-attention computes: (n + 1) / (2 n) for
    n query blocks that skip the key blocks after them (xla: `attention.causal_blocks`; splash: blocks of
    min(512, seq)); 1 for cudnn, whose tiling is not known here."""
    if config.attention_impl == "xla":
        blocks = causal_blocks(seq_len)
    elif config.attention_impl == "splash":
        blocks = seq_len // min(512, seq_len)
    else:
        return 1.0
    return (blocks + 1) / (2 * blocks)


def layer_flops(config: ModelConfig, seq_len: int, scores: float = 1.0) -> float:
    """Forward FLOPs per token of one sandwich block: projections, then q k^T and p v (`scores` of the square)."""
    return float(sum(_projection_flops(config).values()) + scores * 2 * 2 * seq_len * config.hidden_size)


def iteration_flops(config: ModelConfig, seq_len: int, scores: float = 1.0) -> float:
    """Forward FLOPs per token of one recurrence: the adapter's state half (h -> h) and the core layers."""
    return 2 * config.hidden_size**2 + config.num_core_layers * layer_flops(config, seq_len, scores)


def outer_flops(config: ModelConfig, seq_len: int, scores: float = 1.0) -> float:
    """Forward FLOPs per token outside the recurrence: prelude, the adapter's input half, coda and head."""
    layers = config.num_prelude_layers + config.num_coda_layers
    h = config.hidden_size
    return layers * layer_flops(config, seq_len, scores) + 2 * h * h + 2 * h * config.vocab_size


def remat_flops(config: ModelConfig, seq_len: int, scores: float = 1.0) -> float:
    """Forward FLOPs per token that one gradient iteration recomputes in the backward pass, by remat policy."""
    score_flops = scores * 2 * seq_len * config.hidden_size  # q k^T, and as many for p v
    recomputed = {
        "nothing": iteration_flops(config, seq_len, scores),  # the whole iteration
        "names": iteration_flops(config, seq_len, scores) - config.num_core_layers * score_flops,  # all but p v
        "dots": config.num_core_layers * 2 * score_flops,  # the attention products (batched dots are not kept)
        "matmuls": 0.0,  # only elementwise ops are recomputed
        "everything": 0.0,
    }
    return float(recomputed[config.remat_policy])


def forward_flops_per_token(config: ModelConfig, seq_len: int, num_steps: int) -> float:
    return outer_flops(config, seq_len) + num_steps * iteration_flops(config, seq_len)


def train_flops_per_token(config: ModelConfig, seq_len: int, n: int, k: int) -> float:
    """Model FLOPs: n no-gradient iterations cost a forward pass; prelude, coda and the k gradient iterations
    forward + backward."""
    it = iteration_flops(config, seq_len)
    return 3 * (outer_flops(config, seq_len) + k * it) + n * it


def hardware_train_flops_per_token(config: ModelConfig, seq_len: int, n: int) -> float:
    """Hardware FLOPs of the train step: the n no-gradient iterations, and config.mean_backprop_depth gradient
    iterations whatever k (k is traced, so the step runs them all and masks the first ones), each forward +
    backward + what rematerialisation recomputes; attention scores as far as they are computed."""
    scores = score_fraction(config, seq_len)
    it = iteration_flops(config, seq_len, scores)
    grad = config.mean_backprop_depth * (3 * it + remat_flops(config, seq_len, scores))
    return 3 * outer_flops(config, seq_len, scores) + n * it + grad


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
