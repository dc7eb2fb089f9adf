"""The recurrent-depth language model (Huginn architecture) as a thin Flax Linen module.

prelude -> state s_0 -> r x [adapter(concat(s, e)) -> core layers] -> ln_f -> coda -> ln_f -> tied head.

The recurrence over the shared core block runs in two phases, as in truncated backprop training:
`n` iterations without gradient (a `while_loop`, so `n` may be traced and one compilation serves every `n`;
memory does not depend on `n`), then `k` iterations with gradient (`nn.scan`, each iteration rematerialised).
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from recurrent_depth.model.attention import attention_mask
from recurrent_depth.model.config import REMAT_POLICIES, ModelConfig
from recurrent_depth.model.layers import (
    RMSNorm,
    SandwichBlock,
    constrain,
    dense,
    embed_lookup,
    param,
    rope_angles,
    trunc_normal,
)


@flax.struct.dataclass
class HiddenStates:
    """The output of every layer of one forward pass (the residual stream after each block, before any final norm;
    `core[i, -1]` is the raw state after iteration i + 1, whose ln_f is `trajectory[i]`)."""

    prelude: jax.Array  # [num_prelude_layers, batch, seq, embed]; prelude[-1] is the injected input e
    core: jax.Array  # [steps, num_core_layers, batch, seq, embed]
    coda: jax.Array  # [num_coda_layers, batch, seq, embed]; ln_f(coda[-1]) goes into the head


@flax.struct.dataclass
class ModelOutput:
    logits: jax.Array  # [batch, seq, vocab] float32
    latents: jax.Array  # [batch, seq, embed] final state after the final norm (before the coda)
    trajectory: jax.Array | None = None  # [steps, batch, seq, embed] normed state after each iteration
    hidden_states: HiddenStates | None = None  # every layer's output (return_hidden_states=True)


class CoreBlock(nn.Module):
    """One iteration of the recurrence: the linear adapter on concat(state, e), then the core layers.

    The adapter kernel is stored split as [2, embed, embed] (state half, input half) so that the input half,
    the same at every iteration, is applied once per forward pass by `inject` instead of once per iteration.
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.adapter = param(self, "adapter", trunc_normal(cfg.init_std), (2, cfg.hidden_size, cfg.hidden_size),
                             (None, "embed", "mlp"), cfg.weight_dtype)
        self.layers = [SandwichBlock(cfg, name=f"layers_{j}") for j in range(cfg.num_core_layers)]

    def inject(self, e):
        """The prelude output's share of the adapter, e @ W_e.  [batch, seq, embed]."""
        injected = dense(e, self.adapter[1], self.config.compute_dtype, e.dtype)
        return constrain(injected, ("batch", "length", "act_embed"))

    def __call__(self, state, injected, cos, sin, mask, cache=None, return_layers: bool = False):
        """One iteration.  With `cache` (a KVStore at the first core layer) returns (state, cache)."""
        x = dense(state, self.adapter[0], self.config.compute_dtype, state.dtype) + injected
        # Without this constraint XLA's SPMD partitioner (jax 0.10, CPU) miscompiled the following block when the
        # adapter is sharded over (fsdp, tensor): the sharded-vs-single-device tests catch it.
        x = constrain(x, ("batch", "length", "act_embed"))
        if cache is None:
            x, layers = _run_layers(self.layers, x, cos, sin, mask, return_layers)
            return (x, layers) if return_layers else x  # layers: [num_core_layers, batch, seq, embed]
        return _run_cached(self.layers, x, cos, sin, mask, cache)


def _run_layers(layers, x, cos, sin, mask, return_layers: bool = False):
    """Runs consecutive layers; returns the output and, if asked, each layer's output [layers, batch, seq, embed]
    (else None)."""
    outputs = []
    for layer in layers:
        x = layer(x, cos, sin, mask)
        outputs.append(x)
    if not return_layers:
        return x, None
    return x, jnp.stack(outputs) if outputs else jnp.zeros((0, *x.shape), x.dtype)


def _run_cached(layers, x, cos, sin, mask, cache):
    """Runs consecutive layers through a KV store positioned at the first of them; returns (x, cache)."""
    for layer in layers:
        x, cache = layer(x, cos, sin, mask, cache)
        cache = cache.advance()
    return x, cache


def _scan_body(core, state, injected, cos, sin, mask, return_layers=False):
    """One iteration; emits the new state, or with `return_layers` every core layer's output."""
    if return_layers:
        return core(state, injected, cos, sin, mask, return_layers=True)
    new_state = core(state, injected, cos, sin, mask)
    return new_state, new_state


def _masked_scan_body(core, state, active, injected, cos, sin, mask, return_layers=False):
    """An iteration that leaves the state unchanged where `active` is False (traced gradient-iteration counts)."""
    new_state, ys = _scan_body(core, state, injected, cos, sin, mask, return_layers)
    new_state = jnp.where(active, new_state, state)
    return new_state, jnp.where(active, ys, state) if return_layers else new_state


def _stop_gradient_params(fn):
    """Runs `fn(module, ...)` with the module's parameters behind `stop_gradient` (no-gradient iterations)."""
    return nn.map_variables(fn, "params", trans_in_fn=lambda v: jax.tree.map(jax.lax.stop_gradient, v))


def _is_static_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class RecurrentDepthLM(nn.Module):
    """Huginn-style recurrent-depth decoder.  See the module docstring for the forward pass."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.embedding = param(self, "embedding", trunc_normal(cfg.init_std), (cfg.vocab_size, cfg.hidden_size),
                               ("vocab", "embed"), cfg.weight_dtype)
        self.prelude = [SandwichBlock(cfg, name=f"prelude_{i}") for i in range(cfg.num_prelude_layers)]
        self.core = CoreBlock(cfg, name="core")
        self.coda = [SandwichBlock(cfg, name=f"coda_{i}") for i in range(cfg.num_coda_layers)]
        self.ln_f = RMSNorm(cfg.norm_eps, cfg.weight_dtype, name="ln_f")
        if not cfg.tie_embeddings:
            self.lm_head = param(self, "lm_head", trunc_normal(cfg.init_std), (cfg.hidden_size, cfg.vocab_size),
                                 ("embed", "vocab"), cfg.weight_dtype)

    # ---- pieces (also used by decoding) -------------------------------------------------------
    def embed(self, input_ids, cos, sin, mask, cache=None, return_layers: bool = False):
        """Token embedding times sqrt(hidden), then the prelude.  [batch, seq] -> [batch, seq, embed].

        With `cache` (a KVStore at the first prelude layer, see layers.KVStore) returns (x, cache); with
        `return_layers`, (x, every prelude layer's output [num_prelude_layers, batch, seq, embed]).
        """
        cfg = self.config
        x = embed_lookup(self.embedding, input_ids, cfg.stream_dtype) * cfg.embed_scale
        x = constrain(x, ("batch", "length", "act_embed"))
        if cache is not None:
            return _run_cached(self.prelude, x, cos, sin, mask, cache)
        x, layers = _run_layers(self.prelude, x, cos, sin, mask, return_layers)
        return (x, layers) if return_layers else x

    def inject(self, e):
        """The prelude output's share of the adapter (see CoreBlock.inject)."""
        return self.core.inject(e)

    def core_step(self, state, injected, cos, sin, mask, cache=None):
        """One iteration of the core block, for decoding loops that drive the recurrence themselves."""
        return self.core(state, injected, cos, sin, mask, cache)

    def initial_state(self, e, init_scale, positions=None, keys=None):
        """s_0 = trunc_normal(std * init_scale, +-3 std) * sqrt(hidden); zeros when init_scale is 0.

        The noise of a position depends only on its row's key and its position (the key folded with it), so neither
        padding nor the other rows of a batch change a row's state (a bucket-padded prefill draws what an unpadded
        one draws).  e [batch, seq, embed] gives the shape and dtype.  keys [batch]: each row's PRNG key (default:
        the 'state' rng folded with the row's index); positions [batch, seq] int: the RoPE positions (default
        0..seq-1); init_scale: a number, or one per row [batch].
        """
        if isinstance(init_scale, (int, float)) and init_scale == 0:
            return jnp.zeros_like(e)
        batch, seq = e.shape[:2]
        if keys is None:
            if not self.has_rng("state"):
                raise ValueError("a random initial state needs rngs={'state': key}; alternatively pass "
                                 "input_states or init_scale=0 for a deterministic zero state")
            keys = jax.vmap(jax.random.fold_in, (None, 0))(self.make_rng("state"), jnp.arange(batch))
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        draw = lambda key, p: jax.random.truncated_normal(  # noqa: E731
            jax.random.fold_in(key, p), -3.0, 3.0, e.shape[2:], jnp.float32)
        noise = jax.vmap(jax.vmap(draw, (None, 0)), (0, 0))(keys, positions)
        cfg = self.config
        scale = jnp.asarray(init_scale, jnp.float32)
        scale = scale.reshape(scale.shape + (1,) * (e.ndim - scale.ndim))  # one per row: [batch, 1, 1]
        state = noise * (cfg.resolved_state_init_std * cfg.embed_scale * scale)
        return jnp.where(scale == 0, 0.0, state).astype(e.dtype)  # +0, as a zero init_scale's zeros_like

    def iterate(self, state, e, cos, sin, mask, num_steps, return_trajectory: bool = False,
                return_layers: bool = False):
        """Runs the recurrence.  num_steps: an int, all without gradient, or (n, k); n and k may be traced
        (a traced k must not exceed config.mean_backprop_depth).

        Returns the final raw state and, if asked, the raw state after every iteration [steps, b, s, e] (with
        `return_layers`: every core layer's output at every iteration [steps, num_core_layers, b, s, e]).
        """
        n, k = num_steps if isinstance(num_steps, tuple) else (num_steps, 0)
        for value in (n, k):
            if _is_static_int(value) and value < 0:
                raise ValueError(f"num_steps must be non-negative, got {num_steps}")
            if not _is_static_int(value) and jnp.ndim(value) != 0:
                raise ValueError(f"num_steps must hold integer scalars, got {num_steps}")
        return_trajectory = return_trajectory or return_layers
        if return_trajectory and not (_is_static_int(n) and _is_static_int(k)):
            raise ValueError("return_trajectory and return_hidden_states need a static (Python int) number of "
                             "iterations")
        injected = self.core.inject(e)
        if self.is_initializing():  # create the core's parameters outside the loops
            self.core(state, injected, cos, sin, mask)
        states = []
        if not (_is_static_int(n) and n == 0):
            frozen = [jax.lax.stop_gradient(a) for a in (state, injected)]
            if return_trajectory:
                body = functools.partial(_scan_body, return_layers=return_layers)
                scan = nn.scan(_stop_gradient_params(body), variable_broadcast="params",
                               split_rngs={"params": False}, in_axes=(nn.broadcast,) * 4, length=n)
                state, ys = scan(self.core, frozen[0], frozen[1], cos, sin, mask)
                states.append(ys)
            else:
                state = self._no_grad_loop(frozen[0], frozen[1], cos, sin, mask, n)
        # A traced k runs mean_backprop_depth iterations of which only the last k change the state.
        length = k if _is_static_int(k) else self.config.mean_backprop_depth
        if length > 0:
            active = jnp.arange(length) >= length - k
            body = functools.partial(_masked_scan_body, return_layers=return_layers)
            if self.config.remat_policy != "everything":
                body = nn.remat(body, prevent_cse=False, policy=REMAT_POLICIES[self.config.remat_policy])
            scan = nn.scan(body, variable_broadcast="params",
                           split_rngs={"params": False}, in_axes=(0,) + (nn.broadcast,) * 4, length=length)
            state, ys = scan(self.core, state, active, injected, cos, sin, mask)
            states.append(ys)
        trajectory = None
        if return_trajectory:
            empty = (0, self.config.num_core_layers, *state.shape) if return_layers else (0, *state.shape)
            trajectory = jnp.concatenate(states, axis=0) if states else jnp.zeros(empty, state.dtype)
        return state, trajectory

    def _no_grad_loop(self, state, injected, cos, sin, mask, n):
        """n iterations in a while_loop (n may be traced): memory independent of n, one compilation for all n."""

        def cond(core, carry):
            return carry[0] < n

        def body(core, carry):
            i, s = carry
            return i + 1, core(s, injected, cos, sin, mask)

        def loop(core, s):
            return nn.while_loop(cond, body, core, (jnp.zeros((), jnp.int32), s), broadcast_variables="params")[1]

        return _stop_gradient_params(loop)(self.core, state)

    def decode(self, state, cos, sin, mask, return_layers: bool = False):
        """ln_f, coda, ln_f again (same weights), tied head.  Returns (float32 logits, normed latents), with
        `return_layers` also every coda layer's output [num_coda_layers, batch, seq, embed]."""
        y, latents, *layers = self.run_coda(state, cos, sin, mask, return_layers=return_layers)
        return constrain(self.head(y), ("batch", "length", "act_vocab")), latents, *layers

    def run_coda(self, state, cos, sin, mask, cache=None, return_layers: bool = False):
        """ln_f, coda, ln_f again.  Returns (y, normed latents) [batch, seq, embed] each; with `cache` (a KVStore
        at the first coda layer) also the updated cache; with `return_layers` also every coda layer's output."""
        latents = self.ln_f(state)
        if cache is not None:
            y, cache = _run_cached(self.coda, latents, cos, sin, mask, cache)
            return self.ln_f(y), latents, cache
        y, layers = _run_layers(self.coda, latents, cos, sin, mask, return_layers)
        return (self.ln_f(y), latents, layers) if return_layers else (self.ln_f(y), latents)

    def head(self, y):
        """Tied (or separate) output head, float32 logits.  [..., embed] -> [..., vocab]."""
        dt = self.config.compute_dtype
        if self.config.tie_embeddings:  # contract with the [vocab, embed] table as stored (no transposed copy)
            return dense(y, self.embedding, dt, jnp.float32, transposed=True)
        return dense(y, self.lm_head, dt, jnp.float32)

    # ---- the full forward pass ----------------------------------------------------------------
    def __call__(self, input_ids, num_steps: Any = None, *, input_states=None, init_scale=None, positions=None,
                 segment_ids=None, return_trajectory: bool = False, return_hidden_states: bool = False) -> ModelOutput:
        """Forward pass over a batch of token ids [batch, seq].

        num_steps: iterations of the core block; an int (Python or traced) runs them all without gradient
          (inference, like the original's scalar `num_steps`); a pair (n, k) runs n without gradient then k with
          gradient (truncated backprop; a traced k is at most config.mean_backprop_depth, so that one compilation
          serves every sampled (n, k)).  Default: config.mean_recurrence.
        input_states: the initial latent state [batch, seq, embed] (else drawn with rng 'state').
        init_scale: multiplies the state-init std (default config.init_scale; 0 gives a zero state).
        positions: RoPE positions [batch, seq] (default 0..seq-1).
        segment_ids: [batch, seq] document ids; attention stays within a document (document masking).
        return_trajectory: also return the normed state after every iteration (static iteration counts only).
        return_hidden_states: also return every prelude, core (at every iteration) and coda layer's output
          (`HiddenStates`; static iteration counts only).  Both flags are static: off, they cost nothing.
        """
        cfg = self.config
        batch, seq_len = input_ids.shape
        if seq_len > cfg.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds the model's context (max_seq_len={cfg.max_seq_len})")
        input_ids = check_token_ids(input_ids, cfg.vocab_size)
        num_steps = cfg.mean_recurrence if num_steps is None else num_steps
        init_scale = cfg.init_scale if init_scale is None else init_scale
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
        cos, sin = rope_angles(positions, cfg.resolved_head_dim, cfg.rope_base)
        mask = attention_mask(cfg.attention_impl, seq_len, segment_ids)

        e = self.embed(input_ids, cos, sin, mask, return_layers=return_hidden_states)
        e, prelude = e if return_hidden_states else (e, None)
        if input_states is None:
            state = self.initial_state(e, init_scale)
        else:
            if input_states.shape != e.shape:
                raise ValueError(f"input_states must have shape {e.shape}, got {input_states.shape}")
            state = input_states.astype(e.dtype)
        state, trajectory = self.iterate(state, e, cos, sin, mask, num_steps, return_trajectory,
                                         return_layers=return_hidden_states)
        logits, latents, *coda = self.decode(state, cos, sin, mask, return_layers=return_hidden_states)
        hidden = None
        if return_hidden_states:
            hidden = HiddenStates(prelude=prelude, core=trajectory, coda=coda[0])
            trajectory = trajectory[:, -1] if return_trajectory else None
        if trajectory is not None:
            trajectory = self.ln_f(trajectory)
        return ModelOutput(logits=logits, latents=latents, trajectory=trajectory, hidden_states=hidden)


def check_token_ids(input_ids, vocab_size: int):
    """The ids, checked to lie in [0, vocab_size).  Concrete ids out of range raise ValueError.  Traced ids (under
    jit) cannot raise: an out-of-range one becomes the index `vocab_size`, whose embedding lookup is NaN (jnp.take
    fills out-of-bounds rows), so the logits from that position on are NaN, never numbers (a train step counts them
    as a non-finite gradient); under `checkify.checkify(f, errors=checkify.user_checks)` the check raises."""
    if not isinstance(input_ids, jax.core.Tracer):
        ids = np.asarray(input_ids)
        if ids.size == 0:
            raise ValueError("input_ids is empty")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"token ids must lie in [0, {vocab_size}), got values in [{lo}, {hi}]")
        return input_ids
    valid = (input_ids >= 0) & (input_ids < vocab_size)
    checkify.debug_check(jnp.all(valid), f"token ids must lie in [0, {vocab_size}), got values in [{{lo}}, {{hi}}]",
                         lo=input_ids.min(), hi=input_ids.max())
    return jnp.where(valid, input_ids, vocab_size)


def init_params(model: RecurrentDepthLM, rng: jax.Array, seq_len: int = 8):
    """Freshly initialised parameters (boxed with logical axis names; `nn.meta.unbox` for plain arrays)."""
    ids = jnp.zeros((1, min(seq_len, model.config.max_seq_len)), jnp.int32)
    model = RecurrentDepthLM(model.config.replace(attention_impl="xla"))  # same parameters, any sequence length
    init = jax.jit(lambda key: model.init({"params": key}, ids, num_steps=1, init_scale=0.0)["params"])
    return init(rng)
