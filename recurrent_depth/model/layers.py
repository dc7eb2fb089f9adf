"""Building blocks of the Huginn architecture: RMSNorm, rotary embeddings, attention, gated MLP, sandwich block.

Parameters carry logical axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`, `norm`) so that
`recurrent_depth.runtime.sharding` can map them onto a device mesh; without rules they run unsharded.
"""

from __future__ import annotations

from typing import Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from recurrent_depth.model.attention import NEG_INF, attend, target_platform
from recurrent_depth.model.config import ModelConfig


def trunc_normal(std: float):
    """Truncated normal at +-3 std (the std of the parent normal), as torch's `trunc_normal_`."""
    return jax.nn.initializers.truncated_normal(stddev=std, lower=-3.0, upper=3.0)


def param(module: nn.Module, name: str, init, shape, axes, dtype):
    """A parameter with logical axis names."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def dense(x, w, dtype, out_dtype=None, *, transposed: bool = False):
    """x [..., in] times a weight w [in, *out] (`transposed`: w [*out, in], as the tied head's [vocab, embed]
    table) -> [..., *out].  Both are cast to the compute `dtype` and accumulated in float32, returned in
    `out_dtype` (default `dtype`): bfloat16 matmuls that can feed a float32 residual stream.

    On CPU the product runs as one 2-D [tokens, in] x [in, out] matrix product (reshapes are free): XLA:CPU runs a
    dot and both of its gradients without copying an operand only when each operand has one contracting and one
    free dimension; otherwise it transposes activations, their gradients and the weight in every call. Elsewhere
    the weight keeps its axes, so that a sharded out axis (heads, mlp) need not be gathered for the reshape.
    A weight stored in low precision (inference) is multiplied on CPU and TPU through `use_late` (see there).
    """
    def product(x, w):
        x, w = x.astype(dtype), w.astype(dtype)
        lead, out = x.shape[:-1], w.shape[:-1] if transposed else w.shape[1:]
        if target_platform() == "cpu":
            x = x.reshape(-1, x.shape[-1])
            w = w.reshape(-1, w.shape[-1]) if transposed else w.reshape(w.shape[0], -1)
        contract = (x.ndim - 1,), (w.ndim - 1 if transposed else 0,)
        y = jax.lax.dot_general(x, w, (contract, ((), ())), preferred_element_type=jnp.float32)
        return y.reshape(*lead, *out).astype(out_dtype or dtype)

    return use_late(product, x, w) if _stored_for_inference(w) else product(x, w)


def embed_lookup(table, ids, dtype):
    """Rows `ids` [...] of an embedding table [vocab, embed] in `dtype` -> [..., embed]; out-of-range ids give NaN
    rows (jnp.take's fill).  A table stored in low precision is read on CPU and TPU through `use_late`."""
    rows = lambda ids, table: jnp.take(table, ids, axis=0).astype(dtype)  # noqa: E731
    return use_late(rows, ids, table) if _stored_for_inference(table) else rows(ids, table)


def _stored_for_inference(w) -> bool:
    """A weight in low precision (inference; training keeps float32 master weights), on a platform where
    `use_late` pays: not GPUs, where a conditional costs a device-to-host synchronisation."""
    return jnp.dtype(w.dtype).itemsize < 4 and target_platform() in ("cpu", "tpu")


def use_late(fn, x, w):
    """fn(x, w), computed inside a conditional that XLA cannot fold (its predicate depends on x), so that what XLA
    derives from the weight w for this use is made at the use and freed after it.

    Out of a loop XLA moves every computation on a loop-invariant weight, and the decoding loops hold the result
    for their whole run: on CPU, which has no bfloat16 matmul or gather kernels on most processors, the float32
    copy of each weight (three times the bfloat16 weights in all); with FSDP on TPU, the all-gathered weights (the
    whole model on every chip).  Out of a branch it moves nothing, so the workspace is the largest weight (in
    float32 on CPU, gathered on TPU), at the cost of converting or gathering it at every use.

    The predicate is false only if x's first element has all its bits set (a NaN that no arithmetic produces, or
    -1, never a token id); then the result is NaN.
    """
    out = jax.eval_shape(fn, x, w)
    first = jax.lax.bitcast_convert_type(x.reshape(-1)[:1], jnp.dtype(f"uint{8 * x.dtype.itemsize}"))[0]
    nan = lambda x, w: jnp.full(out.shape, jnp.nan, out.dtype)  # noqa: E731
    return jax.lax.cond(~first != 0, fn, nan, x, w)


def constrain(x, axes):
    """Logical sharding constraint on an activation (a no-op outside a mesh with rules)."""
    return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back to the input dtype (the stream's), then scaled (llama style)."""

    eps: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("norm",), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * scale.astype(x.dtype)


def rope_angles(positions, head_dim: int, base: float):
    """cos, sin of the rotary angles, float32.  positions [batch, seq] -> [batch, seq, 1, head_dim // 2] each."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, head_dim // 2]
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rope(x, cos, sin):
    """Rotates interleaved pairs (x[2i], x[2i+1]) in float32, as the original (not the half-split layout)."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)  # [batch, seq, heads, head_dim // 2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


class KVStore(Protocol):
    """Where a cached attention call keeps keys/values (recurrent_depth.decoding.kv_cache.KVCursor implements it)."""

    def attend(self, k, v) -> tuple[jax.Array, jax.Array, jax.Array, KVStore]:
        """Stores the chunk's k, v [batch, seq, heads, head_dim] (after RoPE); returns every entry this call
        reads: keys [batch, heads, head_dim, len], values [batch, heads, len, head_dim], mask [batch, 1, seq, len]
        bool, and the updated store."""


def cached_dot_product_attention(q, keys, values, mask):
    """Softmax attention over cache entries.  q [b, q, h, d], keys [b, h, d, k], values [b, h, k, d] (the
    layouts the two products read without transposing the cache), mask [b, 1, q, k]."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bhdk->bhqk", q, keys, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(jnp.where(mask, logits, NEG_INF), axis=-1).astype(values.dtype)
    return jnp.einsum("bhqk,bhkd->bqhd", probs, values)


class Attention(nn.Module):
    """Fused q|k|v projection, per-head q/k biases before RoPE, causal softmax attention, output projection.

    With `cache` (decoding) the call stores its keys/values there and attends to what the store returns instead
    of using `mask`; it then returns (output, updated store).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache: KVStore | None = None):  # x [batch, seq, embed]
        cfg = self.config
        heads, head_dim, dt = cfg.num_heads, cfg.resolved_head_dim, cfg.compute_dtype
        w_qkv = param(self, "qkv", trunc_normal(cfg.init_std), (cfg.hidden_size, 3, heads, head_dim),
                      ("embed", None, "heads", "kv"), cfg.weight_dtype)
        w_out = param(self, "out", trunc_normal(cfg.out_proj_std), (heads, head_dim, cfg.hidden_size),
                      ("heads", "kv", "embed"), cfg.weight_dtype)
        # The output keeps the weight's axis order, so that XLA need not transpose the weight (a copy per call).
        qkv = dense(x, w_qkv, dt)  # [batch, seq, 3, heads, head_dim]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if cfg.qk_bias:
            bias = param(self, "qk_bias", nn.initializers.zeros, (2, heads, head_dim), (None, "heads", "kv"),
                         cfg.weight_dtype)
            q = (q + bias[0].astype(dt)).astype(dt)
            k = (k + bias[1].astype(dt)).astype(dt)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = constrain(q, ("batch", "length", "act_heads", None))
        if cache is None:
            out = checkpoint_name(attend(q, k, v, impl=cfg.attention_impl, mask=mask), "attention")
            return _project_out(out, w_out, x.dtype)
        keys, values, mask, cache = cache.attend(k, v)
        return _project_out(cached_dot_product_attention(q, keys, values, mask), w_out, x.dtype), cache


def _project_out(out, w_out, out_dtype):
    """[batch, seq, heads, head_dim] x [heads, head_dim, embed] as one [heads * head_dim] contraction (so that
    XLA does not transpose the weight to match the attention output's layout), into the stream's dtype."""
    b, t, h, d = out.shape
    return dense(out.reshape(b, t, h * d), w_out.reshape(h * d, -1), out.dtype, out_dtype)


class GatedMLP(nn.Module):
    """proj(SiLU(gate) * up) with gate the FIRST half of the fused projection, as the original."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):  # x [batch, seq, embed]
        cfg = self.config
        dt = cfg.compute_dtype
        w_fc = param(self, "fc", trunc_normal(cfg.init_std), (cfg.hidden_size, 2, cfg.intermediate_size),
                     ("embed", None, "mlp"), cfg.weight_dtype)
        w_proj = param(self, "proj", trunc_normal(cfg.out_proj_std), (cfg.intermediate_size, cfg.hidden_size),
                       ("mlp", "embed"), cfg.weight_dtype)
        fc = dense(x, w_fc, dt)  # [batch, seq, 2, mlp] (see Attention)
        gate, up = fc[:, :, 0], fc[:, :, 1]
        h = checkpoint_name(constrain(nn.silu(gate) * up, ("batch", "length", "act_mlp")), "mlp_hidden")
        return dense(h, w_proj, dt, x.dtype)


class SandwichBlock(nn.Module):
    """x = norm_2(x + attn(norm_1(x)));  x = norm_4(x + mlp(norm_3(x))).  With `cache`, returns (x, cache).

    Mixed precision as the original trained: x, the norms and the sublayers' outputs are in the stream dtype
    (float32 with float32 weights); only the matmul inputs are in the compute dtype (see `dense`).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache: KVStore | None = None):
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.norm_eps, cfg.weight_dtype, name=name)  # noqa: E731
        attn = Attention(cfg, name="attn")(norm("norm_1")(x), cos, sin, mask, cache)
        if cache is not None:
            attn, cache = attn
        x = norm("norm_2")(x + attn)
        x = norm("norm_4")(x + GatedMLP(cfg, name="mlp")(norm("norm_3")(x)))
        x = constrain(x, ("batch", "length", "act_embed"))
        return x if cache is None else (x, cache)
