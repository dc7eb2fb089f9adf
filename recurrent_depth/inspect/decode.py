"""Per-iteration decoding: the state after every iteration read out through the final norm, coda and head.

Iteration i of one r-iteration call gives exactly what `model.apply(..., num_steps=i)` gives from the same
initial state, so one call shows when the model "knows" each token.  The states themselves give convergence
(relative change per iteration) and, through PCA, the latent trajectories of the paper's analysis.
"""

from __future__ import annotations

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from recurrent_depth.model.attention import attention_mask
from recurrent_depth.model.layers import rope_angles
from recurrent_depth.model.lm import RecurrentDepthLM, check_token_ids


@flax.struct.dataclass
class IterationDecoding:
    """What `decode_iterations` returns; the leading axis is the iteration 1..r."""

    tokens: jax.Array  # [iterations, batch, seq, top_k] int32 the most probable next tokens, most probable first
    probs: jax.Array  # [iterations, batch, seq, top_k] float32 their probabilities
    entropy: jax.Array  # [iterations, batch, seq] float32 entropy of the next-token distribution (nats)
    kl_to_final: jax.Array  # [iterations, batch, seq] float32 KL(p_final || p_i) in nats (0 at the last iteration)
    states: jax.Array  # [iterations, batch, seq, embed] raw state after each iteration (before the final norm)
    initial_state: jax.Array  # [batch, seq, embed] the state the iterations started from
    logits: jax.Array | None = None  # [iterations, batch, seq, vocab] float32 (return_logits=True)


def _rope_and_mask(cfg, batch: int, seq_len: int):
    """cos, sin and the causal mask of positions 0..seq_len-1, as the forward pass builds them."""
    positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
    cos, sin = rope_angles(positions, cfg.resolved_head_dim, cfg.rope_base)
    return cos, sin, attention_mask(cfg.attention_impl, seq_len)


def _iterate(module: RecurrentDepthLM, input_ids, input_states, *, num_steps: int, init_scale: float):
    """(raw states [r, b, s, e], initial state [b, s, e]): the forward pass up to the recurrence, keeping only the
    state after each iteration (not every core layer's output, nor the coda's)."""
    cfg = module.config
    cos, sin, mask = _rope_and_mask(cfg, *input_ids.shape)
    e = module.embed(input_ids, cos, sin, mask)  # [b, s, e]
    if input_states is None:  # drawn as the forward pass draws it (the first and only use of the 'state' rng)
        input_states = module.initial_state(e, init_scale)
    _, states = module.iterate(input_states.astype(e.dtype), e, cos, sin, mask, num_steps, return_trajectory=True)
    return states, input_states


def _summarise(model: RecurrentDepthLM, params, state, rope_and_mask, final_logp, top_k: int, return_logits: bool):
    """One iteration's state [b, s, e] through the coda and head, reduced to what IterationDecoding keeps (the
    logits too with return_logits).  final_logp [b, s, vocab] the last iteration's log-probabilities (None: this
    is the last iteration)."""
    logits, _ = model.apply({"params": params}, state, *rope_and_mask, method=RecurrentDepthLM.decode)  # [b, s, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(logp)
    final = logp if final_logp is None else final_logp
    probs, tokens = jax.lax.top_k(p, top_k)  # [b, s, top_k]
    out = dict(tokens=tokens, probs=probs, entropy=-jnp.sum(p * logp, axis=-1),
               kl_to_final=jnp.sum(jnp.exp(final) * (final - logp), axis=-1))  # [b, s] each
    if return_logits:
        out["logits"] = logits
    return out, logp


@functools.partial(jax.jit, static_argnames=("model", "num_steps", "init_scale", "top_k", "return_logits"))
def _decode_jit(model, params, input_ids, input_states, key, *, num_steps, init_scale, top_k, return_logits):
    """The recurrence once (keeping the states), then the last iteration's decoding, then a scan over iterations
    1..r-1 that decodes one state at a time and keeps only its summaries: memory independent of r beyond the
    outputs (no [r, b, s, vocab] array unless return_logits asks for it)."""
    fn = functools.partial(_iterate, num_steps=num_steps, init_scale=init_scale)
    states, initial = model.apply({"params": params}, input_ids, input_states, method=fn, rngs={"state": key})
    rope_and_mask = _rope_and_mask(model.config, *input_ids.shape)
    summarise = functools.partial(_summarise, model, params, rope_and_mask=rope_and_mask, top_k=top_k,
                                  return_logits=return_logits)
    last, final_logp = summarise(states[-1], final_logp=None)

    def step(_, i):  # states[i] read in place (scanning over states[:-1] would copy them)
        return None, summarise(states[i], final_logp=final_logp)[0]

    _, earlier = jax.lax.scan(step, None, jnp.arange(num_steps - 1))  # [r - 1, ...] each
    out = jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), earlier, last)
    return IterationDecoding(**out, states=states, initial_state=initial)


def decode_iterations(model: RecurrentDepthLM, params, input_ids, num_steps: int, *, input_states=None,
                      init_scale: float | None = None, top_k: int = 5, return_logits: bool = False,
                      seed: int = 0) -> IterationDecoding:
    """Decodes the state after each of iterations 1..num_steps in one compiled function per shape and setting.

    The iterations are decoded one at a time and each is reduced on device to its top-k, entropy and KL, so memory
    grows with num_steps only by what is returned (the states; the logits only with return_logits): 32 iterations
    of 1,024 tokens at a 65,536-token vocabulary hold one iteration's logits, not 32.
    input_ids [batch, seq]; input_states [batch, seq, embed] the initial state (else drawn from `seed` at
    init_scale, default config.init_scale; 0 gives a zero state).
    """
    cfg = model.config
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    if ids.shape[1] > cfg.max_seq_len:
        raise ValueError(f"sequence length {ids.shape[1]} exceeds the model's context (max_seq_len={cfg.max_seq_len})")
    check_token_ids(ids, cfg.vocab_size)
    for name, value, high in (("num_steps", num_steps, None), ("top_k", top_k, cfg.vocab_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if high is not None and value > high:
            raise ValueError(f"{name} ({value}) exceeds the vocabulary size ({high})")
    init_scale = float(cfg.init_scale if init_scale is None else init_scale)
    if init_scale < 0:
        raise ValueError(f"init_scale must be >= 0, got {init_scale}")
    if input_states is not None:
        if tuple(np.shape(input_states)) != (*ids.shape, cfg.hidden_size):
            raise ValueError(f"input_states must have shape {(*ids.shape, cfg.hidden_size)}, got "
                             f"{tuple(np.shape(input_states))}")
        init_scale = 0.0  # unused: one compilation whatever the caller passed
    return _decode_jit(model, nn.meta.unbox(params), jnp.asarray(ids, jnp.int32), input_states,
                       jax.random.key(seed), num_steps=int(num_steps), init_scale=init_scale, top_k=int(top_k),
                       return_logits=bool(return_logits))


def relative_change(states, initial_state) -> np.ndarray:
    """||s_i - s_{i-1}|| / ||s_i|| for i = 1..r (s_0 the initial state), as the latent-diff exit criterion
    measures it.  states [r, ..., embed], initial_state [..., embed] -> [r, ...]."""
    states = np.asarray(states, np.float64)
    previous = np.concatenate([np.asarray(initial_state, np.float64)[None], states[:-1]])
    return np.linalg.norm(states - previous, axis=-1) / np.maximum(np.linalg.norm(states, axis=-1), 1e-30)


def pca(points, num_components: int) -> tuple[np.ndarray, np.ndarray]:
    """Principal components of points [..., dim] (centred over all of them, numpy SVD).  Returns the
    projections [..., k] and the explained-variance ratio [k], k = min(num_components, points - 1, dim) (centred
    points span at most points - 1 directions)."""
    points = np.asarray(points, np.float64)
    flat = points.reshape(-1, points.shape[-1])
    centred = flat - flat.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(num_components, flat.shape[0] - 1, flat.shape[1])
    total = np.sum(singular**2)
    ratio = singular[:k] ** 2 / total if total > 0 else np.zeros(k)
    return (centred @ vt[:k].T).reshape(*points.shape[:-1], k), ratio
