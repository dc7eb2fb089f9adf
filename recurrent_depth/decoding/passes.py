"""The forward passes every sampler shares: a chunk of positions through the prelude, the iterations (fixed or
adaptive per row) and the coda with the KV cache, and the prompt's prefill."""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
from jax.experimental import io_callback

from recurrent_depth.decoding.exit_criteria import ExitCriterion
from recurrent_depth.decoding.kv_cache import Chunk, KVCache
from recurrent_depth.decoding.plan import Plan
from recurrent_depth.model.layers import rope_angles
from recurrent_depth.model.lm import RecurrentDepthLM


def emit(plan: Plan, tokens, steps) -> None:
    """Calls plan.stream on the host, in order, with the tokens final so far [batch, max_new_tokens] (-1 where not
    yet), their count [batch] and the iterations each used [batch, max_new_tokens]; compiles to nothing if None."""
    if plan.stream is not None:
        io_callback(plan.stream, None, tokens, jnp.sum(tokens >= 0, axis=-1, dtype=jnp.int32), steps, ordered=True)


@flax.struct.dataclass
class StepResult:
    cache: KVCache
    logits: jax.Array  # [batch, k, vocab] at the selected chunk positions
    latents: jax.Array  # [batch, k, embed] normed final state at the selected positions
    steps: jax.Array  # [batch] iterations used (0 for inactive rows)


class Runner:
    """Forward passes over chunks with the cache; used inside the compiled loops."""

    def __init__(self, model: RecurrentDepthLM, params, plan: Plan):
        self.model, self.params, self.plan, self.config = model, params, plan, model.config

    def apply(self, method, *args, **kwargs):
        return self.model.apply({"params": self.params}, *args, method=method, **kwargs)

    def prelude(self, cache: KVCache, ids, chunk: Chunk, rope_positions, active):
        """Embeds ids [batch, length] at `chunk` through the prelude, storing its entries for the `active` rows;
        returns (cache, e [batch, length, embed], cos, sin: the chunk's rotary angles)."""
        cfg = self.config
        cos, sin = rope_angles(rope_positions, cfg.resolved_head_dim, cfg.rope_base)
        e, cursor = self.apply(RecurrentDepthLM.embed, ids, cos, sin, None, cache.prelude_cursor(chunk, active))
        return cache.replace(prelude=cursor.group), e, cos, sin

    def step(self, cache: KVCache, ids, chunk: Chunk, rope_positions, active, select, key, *, num_steps: int,
             criterion: ExitCriterion, state=None) -> StepResult:
        """Processes ids [batch, length] at `chunk`: prelude, up to num_steps iterations (rows exit on their own
        by `criterion`, judged on the last selected position), coda.  Rows not `active` [batch] do nothing.

        select [batch, k]: chunk positions whose logits/latents are returned.  state [batch, length, embed]:
        the initial state (continuous thinking); else drawn with `key` at the plan's init_scale.
        """
        cache, e, cos, sin = self.prelude(cache, ids, chunk, rope_positions, active)
        if state is None:
            state = self.apply(RecurrentDepthLM.initial_state, e, self.plan.init_scale, rngs={"state": key})
        chunk_pass = ChunkPass(self, chunk, cos, sin, self.apply(RecurrentDepthLM.inject, e), select)
        if criterion.name is None:
            return chunk_pass.fixed_depth(cache, state, active, num_steps)
        return chunk_pass.adaptive(cache, state, active, num_steps, criterion)


@dataclasses.dataclass(frozen=True)
class ChunkPass:
    """The iterations and the coda of one chunk, after its prelude."""

    runner: Runner
    chunk: Chunk
    cos: jax.Array  # [batch, length, 1, head_dim // 2] rotary angles of the chunk's positions
    sin: jax.Array
    injected: jax.Array  # [batch, length, embed] the prelude output's share of the adapter
    select: jax.Array  # [batch, k] chunk positions whose logits/latents are returned

    def iterate(self, i, state, cache: KVCache, running):
        """Iteration i for the `running` rows (the others keep their state and store nothing)."""
        new_state, cursor = self.runner.apply(RecurrentDepthLM.core_step, state, self.injected, self.cos, self.sin,
                                              None, cache.core_cursor(self.chunk, running, i))
        return jnp.where(running[:, None, None], new_state, state), cache.replace(core=cursor.group)

    def coda(self, cache: KVCache, state, rows):
        """(logits [batch, k, vocab], latents [batch, k, embed]) at the selected positions; stores the coda
        entries of `rows`."""
        y, latents, cursor = self.runner.apply(RecurrentDepthLM.run_coda, state, self.cos, self.sin, None,
                                               cache.coda_cursor(self.chunk, rows))
        pick = lambda x: jnp.take_along_axis(x, self.select[:, :, None], axis=1)  # noqa: E731
        return self.runner.apply(RecurrentDepthLM.head, pick(y)), pick(latents), cache.replace(coda=cursor.group)

    def fixed_depth(self, cache, state, active, num_steps: int) -> StepResult:
        """num_steps iterations, then the coda once."""
        def body(carry):
            i, state, cache = carry
            return (i + 1, *self.iterate(i, state, cache, active))

        _, state, cache = jax.lax.while_loop(lambda c: (c[0] < num_steps) & jnp.any(active), body,
                                             (jnp.zeros((), jnp.int32), state, cache))
        logits, latents, cache = self.coda(cache, state, active)
        return StepResult(cache, logits, latents, jnp.where(active, num_steps, 0).astype(jnp.int32))

    def adaptive(self, cache, state, active, num_steps: int, criterion: ExitCriterion) -> StepResult:
        """Iterates until every active row has exited (criterion checked after iteration min_steps + 1, then
        every check_every) or num_steps; each row's logits/latents are those of its exit iteration."""
        cfg, plan = self.runner.config, self.runner.plan
        weights = self.chunk.real.astype(jnp.float32)
        batch, k = self.select.shape
        no_logits = jnp.zeros((batch, k, cfg.vocab_size), jnp.float32)
        no_latents = jnp.zeros((batch, k, cfg.hidden_size), state.dtype)
        skip = lambda cache, state, rows: (no_logits, no_latents, cache)  # noqa: E731  (iterations without coda)

        def body(carry):
            i, state, cache, running, crit, out_logits, out_latents, steps = carry
            state, cache = self.iterate(i, state, cache, running)
            check = (i >= plan.min_steps) & ((i - plan.min_steps) % plan.check_every == 0)
            last = i == num_steps - 1
            if criterion.needs_logits:  # the coda at every check
                logits, latents, cache = jax.lax.cond(check | last, self.coda, skip, cache, state, running)
                exit_now, new_crit = criterion.check(crit, state, weights, logits[:, -1])
                exits = running & ((check & exit_now) | last)
            else:  # latent criteria: the coda only when a row exits
                exit_now, new_crit = criterion.check(crit, state, weights, None)
                exits = running & ((check & exit_now) | last)
                logits, latents, cache = jax.lax.cond(jnp.any(exits), self.coda, skip, cache, state, exits)
            crit = jax.tree.map(lambda new, old: jnp.where(check, new, old), new_crit, crit)
            keep = exits[:, None, None]
            return (i + 1, state, cache, running & ~exits, crit, jnp.where(keep, logits, out_logits),
                    jnp.where(keep, latents, out_latents), jnp.where(exits, i + 1, steps))

        init = (jnp.zeros((), jnp.int32), state, cache, active, criterion.init(state, cfg.vocab_size), no_logits,
                no_latents, jnp.zeros((batch,), jnp.int32))
        _, _, cache, _, _, logits, latents, steps = jax.lax.while_loop(
            lambda c: (c[0] < num_steps) & jnp.any(c[3]), body, init)
        return StepResult(cache, logits, latents, steps)


def _layout(ids, lengths, left_padded: bool):
    """Where each row's prompt lies in the buffer: (first index [b], prompt Chunk, RoPE positions [b, p])."""
    batch, prompt_len = ids.shape
    first = prompt_len - lengths if left_padded else jnp.zeros_like(lengths)
    idx = jnp.arange(prompt_len, dtype=jnp.int32)[None, :]
    real = (idx >= first[:, None]) & (idx < (first + lengths)[:, None])
    return first, Chunk(start=jnp.zeros((batch,), jnp.int32), real=real), jnp.maximum(idx - first[:, None], 0)


def prefill(runner: Runner, ids, lengths, key, max_len: int, num_steps: int, cache_steps: int):
    """Creates the cache and runs the prompt; returns (first [batch]: buffer index of each prompt, StepResult)."""
    plan, cfg = runner.plan, runner.config
    cache = KVCache.create(cfg, ids.shape[0], max_len, plan.strategy, cache_steps)
    first, chunk, rope = _layout(ids, lengths, plan.left_padded)
    last = (first + lengths - 1)[:, None]  # the prompt's last position judges its exit and gives the first token
    active = jnp.ones(ids.shape[:1], bool)
    result = runner.step(cache, ids, chunk, rope, active, last, key, num_steps=num_steps, criterion=plan.criterion)
    return first, result
