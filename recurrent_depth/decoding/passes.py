"""The forward passes every sampler shares: a chunk of positions through the prelude, the iterations (fixed or
adaptive per row) and the coda with the KV cache, and the prompt's prefill.

Every setting that may differ between rows (iterations, exit criterion and threshold, min_steps, check_every,
continuous thinking, init_scale) comes as a `RowSettings` array, so one compilation serves any mix of them: the
serving engine's decode step runs slots of different requests together, and `generate` runs the same code with its
scalars broadcast.  Randomness is per row too: row r's key, folded with the token's index, gives that token's
initial-state and sampling keys (`token_keys`), and the initial state's noise of a position depends on its key and
RoPE position only; so a row's output never depends on the other rows or on padding.
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
from jax.experimental import io_callback

from recurrent_depth.decoding.exit_criteria import CriterionSet
from recurrent_depth.decoding.kv_cache import Chunk, KVCache
from recurrent_depth.decoding.plan import Plan, RowSettings
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


def row_keys(key, batch: int):
    """[batch] keys, row r's fold_in(key, r): what `generate` gives each row from its seed."""
    return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(batch))


def token_keys(keys, index):
    """(initial-state keys, sampling keys) [batch] each for the token numbered `index` (a scalar or [batch]) of each
    row: split(fold_in(row key, index))."""
    index = jnp.broadcast_to(index, keys.shape)
    pairs = jax.vmap(lambda key, i: jax.random.split(jax.random.fold_in(key, i)))(keys, index)
    return pairs[:, 0], pairs[:, 1]


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

    def initial_state(self, e, rope_positions, keys, init_scale):
        """The random initial state [batch, length, embed] of e's shape: each position's noise from its row's key
        [batch] and RoPE position; init_scale [batch] (zeros when the plan's init_scale is 0)."""
        if not self.plan.random_init:
            return jnp.zeros_like(e)
        return self.apply(RecurrentDepthLM.initial_state, e, init_scale, rope_positions, keys)

    def step(self, cache: KVCache, ids, chunk: Chunk, rope_positions, active, select, keys, rows: RowSettings, *,
             state=None) -> StepResult:
        """Processes ids [batch, length] at `chunk`: prelude, up to rows.num_steps iterations (with an exit
        criterion each row exits on its own, judged on its last selected position), coda.  Rows not `active`
        [batch] do nothing.

        select [batch, k]: chunk positions whose logits/latents are returned.  keys [batch]: each row's key for its
        random initial state.  state [batch, length, embed]: the initial state of the rows whose rows.continuous is
        set (continuous thinking; None: every row draws its own).
        """
        cache, e, cos, sin = self.prelude(cache, ids, chunk, rope_positions, active)
        initial = self.initial_state(e, rope_positions, keys, rows.init_scale)
        if state is not None and self.plan.may_continue:
            initial = jnp.where(rows.continuous[:, None, None], state.astype(initial.dtype), initial)
        chunk_pass = ChunkPass(self, chunk, cos, sin, self.apply(RecurrentDepthLM.inject, e), select)
        criteria = self.plan.criteria
        if criteria is None:
            return chunk_pass.fixed_depth(cache, initial, active, rows.num_steps)
        return chunk_pass.adaptive(cache, initial, active, rows, criteria)


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

    def fixed_depth(self, cache, state, active, num_steps) -> StepResult:
        """num_steps [batch] iterations for each active row, then the coda once."""
        def body(carry):
            i, state, cache = carry
            return (i + 1, *self.iterate(i, state, cache, active & (i < num_steps)))

        deepest = jnp.max(jnp.where(active, num_steps, 0))
        _, state, cache = jax.lax.while_loop(lambda c: c[0] < deepest, body, (jnp.zeros((), jnp.int32), state, cache))
        logits, latents, cache = self.coda(cache, state, active)
        return StepResult(cache, logits, latents, jnp.where(active, num_steps, 0).astype(jnp.int32))

    def adaptive(self, cache, state, active, rows: RowSettings, criteria: CriterionSet) -> StepResult:
        """Iterates until every active row has exited: by its criterion (checked after iteration min_steps + 1,
        then every check_every; criterion 0 never) or after its num_steps.  Each row's logits/latents are those of
        its exit iteration.  The coda runs at an iteration only for the rows that need it: those exiting, and
        those whose criterion reads the logits at a check."""
        cfg = self.runner.config
        weights = self.chunk.real.astype(jnp.float32)
        batch, k = self.select.shape
        no_logits = jnp.zeros((batch, k, cfg.vocab_size), jnp.float32)
        no_latents = jnp.zeros((batch, k, cfg.hidden_size), state.dtype)
        skip = lambda cache, state, _: (no_logits, no_latents, cache)  # noqa: E731  (iterations without coda)
        reads_logits = criteria.needs_logits(rows.criterion)

        def body(carry):
            i, state, cache, running, crit, out_logits, out_latents, steps = carry
            state, cache = self.iterate(i, state, cache, running)
            check = (i >= rows.min_steps) & ((i - rows.min_steps) % rows.check_every == 0)
            last = i == rows.num_steps - 1
            # Latent criteria (and fixed depth) decide before the coda, logit criteria after it.
            exit_latent, new_latent = criteria.check(crit, rows.criterion, rows.threshold, running & check, state,
                                                     weights)
            exits = running & ~reads_logits & (exit_latent | last)
            coda_rows = exits | (running & reads_logits & (check | last))
            logits, latents, cache = jax.lax.cond(jnp.any(coda_rows), self.coda, skip, cache, state, coda_rows)
            if criteria.logit_names:
                exit_logits, new_logits = criteria.check(crit, rows.criterion, rows.threshold, running & check,
                                                         state, weights, logits[:, -1])
                exits = exits | (running & reads_logits & (exit_logits | last))
                new_latent = {**new_latent, **new_logits}
            crit = {**crit, **jax.tree.map(lambda new, old: jnp.where(check.reshape(-1, *(1,) * (new.ndim - 1)),
                                                                      new, old), new_latent,
                                           {key: crit[key] for key in new_latent})}
            keep = exits[:, None, None]
            return (i + 1, state, cache, running & ~exits, crit, jnp.where(keep, logits, out_logits),
                    jnp.where(keep, latents, out_latents), jnp.where(exits, i + 1, steps))

        init = (jnp.zeros((), jnp.int32), state, cache, active, criteria.init(state, cfg.vocab_size), no_logits,
                no_latents, jnp.zeros((batch,), jnp.int32))
        deepest = jnp.max(jnp.where(active, rows.num_steps, 0))  # (every running row exits by then)
        _, _, cache, _, _, logits, latents, steps = jax.lax.while_loop(
            lambda c: (c[0] < deepest) & jnp.any(c[3]), body, init)
        return StepResult(cache, logits, latents, steps)


def _layout(ids, lengths, left_padded: bool):
    """Where each row's prompt lies in the buffer: (first index [b], prompt Chunk, RoPE positions [b, p])."""
    batch, prompt_len = ids.shape
    first = prompt_len - lengths if left_padded else jnp.zeros_like(lengths)
    idx = jnp.arange(prompt_len, dtype=jnp.int32)[None, :]
    real = (idx >= first[:, None]) & (idx < (first + lengths)[:, None])
    return first, Chunk(start=jnp.zeros((batch,), jnp.int32), real=real), jnp.maximum(idx - first[:, None], 0)


def prefill(runner: Runner, ids, lengths, keys, max_len: int, rows: RowSettings, cache_steps: int | None = None):
    """Creates the cache (max_len positions, room for cache_steps iterations per token, default the plan's) and
    runs the prompts ids [batch, prompt_len] (lengths [batch]) with each row's initial-state key (keys [batch]) and
    settings; returns (first [batch]: buffer index of each prompt, StepResult at each prompt's last position)."""
    plan, cfg = runner.plan, runner.config
    cache_steps = plan.cache_steps if cache_steps is None else cache_steps
    cache = KVCache.create(cfg, ids.shape[0], max_len, plan.strategy, cache_steps)
    first, chunk, rope = _layout(ids, lengths, plan.left_padded)
    last = (first + lengths - 1)[:, None]  # the prompt's last position judges its exit and gives the first token
    active = jnp.ones(ids.shape[:1], bool)
    return first, runner.step(cache, ids, chunk, rope, active, last, keys, rows)
