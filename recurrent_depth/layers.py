"""Building blocks of the Huginn architecture: RMSNorm, rotary embeddings, attention, gated MLP, sandwich block.

Parameters carry logical axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`, `norm`) so that
`recurrent_depth.sharding` can map them onto a device mesh; without rules they run unsharded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from recurrent_depth.config import ModelConfig

NEG_INF = -1e30  # finite, so fully masked rows (padding) give a uniform softmax instead of NaN


def trunc_normal(std: float):
    """Truncated normal at +-3 std (the std of the parent normal), as torch's `trunc_normal_`."""
    return jax.nn.initializers.truncated_normal(stddev=std, lower=-3.0, upper=3.0)


def param(module: nn.Module, name: str, init, shape, axes, dtype):
    """A parameter with logical axis names."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def constrain(x, axes):
    """Logical sharding constraint on an activation (a no-op outside a mesh with rules)."""
    return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back to the input dtype, then scaled (llama style)."""

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


def causal_mask(seq_len: int, segment_ids=None):
    """Boolean attention mask [batch|1, 1, q, k]: causal, and within one segment (document) if ids are given."""
    idx = jnp.arange(seq_len)
    mask = (idx[:, None] >= idx[None, :])[None, None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return mask


def dot_product_attention(q, k, v, mask):
    """Softmax attention with float32 logits.  q [b, q, h, d], k/v [b, k, h, d], mask [b|1, 1|h, q, k]."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask, logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class Attention(nn.Module):
    """Fused q|k|v projection, per-head q/k biases before RoPE, causal softmax attention, output projection."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask):  # x [batch, seq, embed]
        cfg = self.config
        heads, head_dim, dt = cfg.num_heads, cfg.resolved_head_dim, cfg.compute_dtype
        w_qkv = param(self, "qkv", trunc_normal(cfg.init_std), (cfg.hidden_size, 3, heads, head_dim),
                      ("embed", None, "heads", "kv"), cfg.weight_dtype)
        w_out = param(self, "out", trunc_normal(cfg.out_proj_std), (heads, head_dim, cfg.hidden_size),
                      ("heads", "kv", "embed"), cfg.weight_dtype)
        q, k, v = jnp.einsum("bte,ephd->pbthd", x, w_qkv.astype(dt))  # 3 x [batch, seq, heads, head_dim]
        if cfg.qk_bias:
            bias = param(self, "qk_bias", nn.initializers.zeros, (2, heads, head_dim), (None, "heads", "kv"),
                         cfg.weight_dtype)
            q = (q + bias[0].astype(dt)).astype(dt)
            k = (k + bias[1].astype(dt)).astype(dt)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = constrain(q, ("batch", "length", "act_heads", None))
        out = dot_product_attention(q, k, v, mask)  # [batch, seq, heads, head_dim]
        return jnp.einsum("bthd,hde->bte", out, w_out.astype(dt))


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
        gate, up = jnp.einsum("bte,epi->pbti", x, w_fc.astype(dt))
        h = constrain(nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return jnp.einsum("bti,ie->bte", h, w_proj.astype(dt))


class SandwichBlock(nn.Module):
    """x = norm_2(x + attn(norm_1(x)));  x = norm_4(x + mlp(norm_3(x)))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask):
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.norm_eps, cfg.weight_dtype, name=name)  # noqa: E731
        x = norm("norm_2")(x + Attention(cfg, name="attn")(norm("norm_1")(x), cos, sin, mask))
        x = norm("norm_4")(x + GatedMLP(cfg, name="mlp")(norm("norm_3")(x)))
        return constrain(x, ("batch", "length", "act_embed"))
