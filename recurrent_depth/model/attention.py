"""Causal softmax attention, three implementations with one signature.

  xla    plain einsums with float32 logits (the reference; every platform)
  cudnn  `jax.nn.dot_product_attention(implementation="cudnn")` (NVIDIA GPUs, bf16/fp16)
  splash the Pallas TPU splash-attention kernel inside `jax.shard_map` (batch over the mesh's batch axes, heads
         over its tensor axis); `interpret=True` runs it on CPU for tests

q [batch, q_len, heads, head_dim], k/v [batch, kv_len, heads, head_dim]; attention is causal and, with
`segment_ids` [batch, len], stays within a segment (document masking).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS = ("xla", "cudnn", "splash")
NEG_INF = -1e30  # finite, so fully masked rows (padding) give a uniform softmax instead of NaN


def causal_mask(seq_len: int, segment_ids=None):
    """Boolean attention mask [batch|1, 1, q, k]: causal, and within one segment (document) if ids are given."""
    idx = jnp.arange(seq_len)
    mask = (idx[:, None] >= idx[None, :])[None, None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return mask


def causal_blocks(seq_len: int) -> int:
    """How many query blocks `xla_attention` splits causal self-attention over `seq_len` into: block i attends only
    to the keys up to its own end (all later keys are masked), so the scores cost (n + 1) / (2 n) of the full
    square.  Blocks of at least 64 queries, at most 8 of them, dividing seq_len; 1 means no split."""
    most = min(8, seq_len // 64)
    return max((n for n in range(1, most + 1) if seq_len % n == 0), default=1)


def xla_attention(q, k, v, mask):
    """Causal softmax attention with float32 logits.  mask [b|1, 1|h, q, k] (True = attend), causal.

    Self-attention runs in `causal_blocks` query blocks that skip the key blocks after them: those scores are all
    masked, so each block's softmax is the full one's (exp of the masked logits is exactly 0) at fewer FLOPs.
    """
    if q.shape[1] != k.shape[1] or (blocks := causal_blocks(q.shape[1])) == 1:
        return _masked_attention(q, k, v, mask)
    size = q.shape[1] // blocks
    outputs = [_masked_attention(q[:, i * size:(i + 1) * size], k[:, :(i + 1) * size], v[:, :(i + 1) * size],
                                 mask[..., i * size:(i + 1) * size, :(i + 1) * size]) for i in range(blocks)]
    return jnp.concatenate(outputs, axis=1)


def _masked_attention(q, k, v, mask):
    """Softmax attention with float32 logits over every (query, key) pair, masked."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask, logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def cudnn_attention(q, k, v, segment_ids):
    """cuDNN fused attention (GPU); document masking through a boolean mask."""
    mask = None if segment_ids is None else causal_mask(q.shape[1], segment_ids)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=segment_ids is None,
                                        implementation="cudnn")


def _splash_local(q, k, v, segment_ids, interpret: bool):
    """Splash attention on this device's shard: q/k/v [b, s, h, d], segment_ids [b, s]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    batch, seq, heads, head_dim = q.shape
    block = min(512, seq)
    kernel = sk.make_splash_mha(
        sm.MultiHeadMask([sm.CausalMask((seq, seq)) for _ in range(heads)]),
        block_sizes=sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                  block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block),
        head_shards=1, q_seq_shards=1, interpret=interpret)
    to_heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [b, h, s, d]
    q = to_heads_first(q * jnp.asarray(head_dim**-0.5, q.dtype))  # the kernel does not scale
    k, v = to_heads_first(k), to_heads_first(v)
    if segment_ids is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(q=s, kv=s)))(q, k, v, segment_ids)
    return jnp.swapaxes(out, 1, 2)


def splash_attention(q, k, v, segment_ids, interpret: bool = False):
    """Splash attention, under `jax.shard_map` over the current mesh when one is set (Mosaic kernels cannot be
    partitioned automatically): batch over the mesh axes of the `batch` logical axis, heads over `act_heads`."""
    mesh = jax.sharding.get_abstract_mesh()
    local = functools.partial(_splash_local, interpret=interpret)
    if mesh.empty:
        return local(q, k, v, segment_ids)
    batch_axes, head_axes = nn.logical_to_mesh_axes(("batch", "act_heads"))
    spec = P(batch_axes, None, head_axes, None)
    seg_spec = P(batch_axes, None)
    if segment_ids is None:
        return jax.shard_map(lambda q, k, v: local(q, k, v, None), in_specs=(spec,) * 3, out_specs=spec,
                             check_vma=False)(q, k, v)
    return jax.shard_map(local, in_specs=(spec, spec, spec, seg_spec), out_specs=spec, check_vma=False)(
        q, k, v, segment_ids)


def target_platform() -> str:
    """The platform the computation is for: that of the devices of the mesh in context (even TPU devices of an
    ahead-of-time topology on a CPU machine), else the default backend's."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


def attention_mask(impl: str, seq_len: int, segment_ids=None):
    """What `attend` takes as `mask`: the dense causal (and document) mask for xla; for the fused kernels, which
    build their masks themselves, the segment ids (None: plain causal)."""
    return causal_mask(seq_len, segment_ids) if impl == "xla" else segment_ids


def attend(q, k, v, *, impl: str, mask):
    """Dispatches to an implementation; `mask` comes from `attention_mask`."""
    if impl == "xla":
        return xla_attention(q, k, v, mask)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, mask)
    if impl == "splash":
        return splash_attention(q, k, v, mask, interpret=target_platform() != "tpu")  # elsewhere interpreted
    raise ValueError(f"unknown attention implementation {impl!r}; valid: {IMPLEMENTATIONS}")
