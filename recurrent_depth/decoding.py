"""Compiled generation: KV cache, per-token adaptive exit, continuous thinking, self-speculative decoding.

Everything after input checking runs in one jitted function per shape and setting: the prompt is one forward
pass (a "chunk"), then a `lax.while_loop` produces one token per step.  Each chunk runs the prelude once, then
the core block one iteration at a time (another `while_loop`), so that every sequence can stop iterating on its
own (adaptive exit); rows that stopped, or whose sequence finished, store no cache entries from then on.

Prompts sit in one buffer of `prompt_len + max_new_tokens` positions per row, padded on the left (generation
then writes the same column in every row) or on the right; RoPE positions count from each row's first token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from recurrent_depth.exit_criteria import ExitCriterion
from recurrent_depth.kv_cache import CacheStrategy, Chunk, KVCache
from recurrent_depth.layers import rope_angles
from recurrent_depth.model import RecurrentDepthLM
from recurrent_depth.sampling import Sampler


@flax.struct.dataclass
class GenerateOutput:
    tokens: jax.Array  # [batch, max_new_tokens] int32 generated tokens; -1 once a sequence has finished
    num_tokens: jax.Array  # [batch] int32 tokens generated, a final stop token included
    steps: jax.Array  # [batch, max_new_tokens] int32 iterations of the core block each token used (0 past the end)
    logits: jax.Array | None = None  # [batch, max_new_tokens, vocab] float32: what each token was chosen from

    @property
    def steps_per_sequence(self):
        """[batch] iterations used over all generated tokens of each sequence."""
        return self.steps.sum(axis=-1)


@flax.struct.dataclass
class SpeculativeOutput:
    tokens: jax.Array  # [batch, max_new_tokens] int32 generated tokens; -1 once a sequence has finished
    num_tokens: jax.Array  # [batch] int32
    rounds: jax.Array  # [batch] int32 draft-and-verify rounds (tokens per round = num_tokens / rounds)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static settings of one compiled generation."""

    max_new_tokens: int
    cache_steps: int  # iterations per token the cache has room for (the num_steps argument may be lower)
    init_scale: float
    sampler: Sampler
    strategy: CacheStrategy
    left_padded: bool
    continuous: bool = False
    criterion: ExitCriterion = ExitCriterion()
    min_steps: int = 0
    check_every: int = 1
    return_logits: bool = False
    stream: Callable | None = None  # host function called after every decoding step (see `emit`)


def emit(plan: _Plan, tokens, steps) -> None:
    """Calls plan.stream on the host, in order, with the tokens final so far [batch, max_new_tokens] (-1 where not
    yet), their count [batch] and the iterations each used [batch, max_new_tokens]; compiles to nothing if None."""
    if plan.stream is not None:
        io_callback(plan.stream, None, tokens, jnp.sum(tokens >= 0, axis=-1, dtype=jnp.int32), steps, ordered=True)


@flax.struct.dataclass
class _StepResult:
    cache: KVCache
    logits: jax.Array  # [batch, k, vocab] at the selected chunk positions
    latents: jax.Array  # [batch, k, embed] normed final state at the selected positions
    steps: jax.Array  # [batch] iterations used (0 for inactive rows)


class _Runner:
    """Forward passes over chunks with the cache; used inside the compiled loops."""

    def __init__(self, model: RecurrentDepthLM, params, plan: _Plan):
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
             criterion: ExitCriterion, state=None) -> _StepResult:
        """Processes ids [batch, length] at `chunk`: prelude, up to num_steps iterations (rows exit on their own
        by `criterion`, judged on the last selected position), coda.  Rows not `active` [batch] do nothing.

        select [batch, k]: chunk positions whose logits/latents are returned.  state [batch, length, embed]:
        the initial state (continuous thinking); else drawn with `key` at the plan's init_scale.
        """
        cache, e, cos, sin = self.prelude(cache, ids, chunk, rope_positions, active)
        if state is None:
            state = self.apply(RecurrentDepthLM.initial_state, e, self.plan.init_scale, rngs={"state": key})
        chunk_pass = _ChunkPass(self, chunk, cos, sin, self.apply(RecurrentDepthLM.inject, e), select)
        if criterion.name is None:
            return chunk_pass.fixed_depth(cache, state, active, num_steps)
        return chunk_pass.adaptive(cache, state, active, num_steps, criterion)


@dataclasses.dataclass(frozen=True)
class _ChunkPass:
    """The iterations and the coda of one chunk, after its prelude."""

    runner: _Runner
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

    def fixed_depth(self, cache, state, active, num_steps: int) -> _StepResult:
        """num_steps iterations, then the coda once."""
        def body(carry):
            i, state, cache = carry
            return (i + 1, *self.iterate(i, state, cache, active))

        _, state, cache = jax.lax.while_loop(lambda c: (c[0] < num_steps) & jnp.any(active), body,
                                             (jnp.zeros((), jnp.int32), state, cache))
        logits, latents, cache = self.coda(cache, state, active)
        return _StepResult(cache, logits, latents, jnp.where(active, num_steps, 0).astype(jnp.int32))

    def adaptive(self, cache, state, active, num_steps: int, criterion: ExitCriterion) -> _StepResult:
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
        return _StepResult(cache, logits, latents, steps)


def _layout(ids, lengths, left_padded: bool):
    """Where each row's prompt lies in the buffer: (first index [b], prompt Chunk, RoPE positions [b, p])."""
    batch, prompt_len = ids.shape
    first = prompt_len - lengths if left_padded else jnp.zeros_like(lengths)
    idx = jnp.arange(prompt_len, dtype=jnp.int32)[None, :]
    real = (idx >= first[:, None]) & (idx < (first + lengths)[:, None])
    return first, Chunk(start=jnp.zeros((batch,), jnp.int32), real=real), jnp.maximum(idx - first[:, None], 0)


def _prefill(runner: _Runner, ids, lengths, key, max_len: int, num_steps: int, cache_steps: int):
    """Creates the cache and runs the prompt; returns (first [batch]: buffer index of each prompt, StepResult)."""
    plan, cfg = runner.plan, runner.config
    cache = KVCache.create(cfg, ids.shape[0], max_len, plan.strategy, cache_steps)
    first, chunk, rope = _layout(ids, lengths, plan.left_padded)
    last = (first + lengths - 1)[:, None]  # the prompt's last position judges its exit and gives the first token
    active = jnp.ones(ids.shape[:1], bool)
    result = runner.step(cache, ids, chunk, rope, active, last, key, num_steps=num_steps, criterion=plan.criterion)
    return first, result


def _generate(model, plan: _Plan, params, ids, lengths, stops, key, num_steps):
    """The compiled body of `generate`: prefill, then one token per while_loop step (num_steps traced)."""
    runner = _Runner(model, params, plan)
    batch, new = ids.shape[0], plan.max_new_tokens
    max_len = ids.shape[1] + new
    k_state, k_sample = jax.random.split(jax.random.fold_in(key, 0))
    first, res = _prefill(runner, ids, lengths, k_state, max_len, num_steps, plan.cache_steps)
    token = plan.sampler(res.logits[:, 0], k_sample)
    out = dict(tokens=jnp.full((batch, new), -1, jnp.int32).at[:, 0].set(token),
               steps=jnp.zeros((batch, new), jnp.int32).at[:, 0].set(res.steps))
    if plan.return_logits:
        out["logits"] = jnp.zeros((batch, new, model.config.vocab_size), jnp.float32).at[:, 0].set(res.logits[:, 0])
    finished = jnp.isin(token, stops)
    start = first + lengths  # buffer index of the first generated token
    emit(plan, out["tokens"], out["steps"])

    def body(carry):
        n, cache, token, latent, finished, out = carry
        k_state, k_sample = jax.random.split(jax.random.fold_in(key, n))
        chunk = Chunk(start=start + n - 1, real=jnp.ones((batch, 1), bool))
        rope = (lengths + n - 1)[:, None]
        res = runner.step(cache, jnp.maximum(token, 0)[:, None], chunk, rope, ~finished,
                          jnp.zeros((batch, 1), jnp.int32), k_state, num_steps=num_steps,
                          criterion=plan.criterion, state=latent if plan.continuous else None)
        token = jnp.where(finished, -1, plan.sampler(res.logits[:, 0], k_sample))
        out = dict(out, tokens=out["tokens"].at[:, n].set(token), steps=out["steps"].at[:, n].set(res.steps))
        if plan.return_logits:
            out["logits"] = out["logits"].at[:, n].set(jnp.where(finished[:, None], 0.0, res.logits[:, 0]))
        latent = jnp.where(finished[:, None, None], latent, res.latents)
        emit(plan, out["tokens"], out["steps"])
        return n + 1, res.cache, token, latent, finished | jnp.isin(token, stops), out

    def cond(carry):
        return (carry[0] < new) & ~jnp.all(carry[4])

    carry = (jnp.ones((), jnp.int32), res.cache, token, res.latents, finished, out)
    *_, out = jax.lax.while_loop(cond, body, carry)
    return GenerateOutput(tokens=out["tokens"], num_tokens=jnp.sum(out["tokens"] >= 0, axis=-1, dtype=jnp.int32),
                          steps=out["steps"], logits=out.get("logits"))


def _speculative(model, plan: _Plan, draft_steps: int, lookahead: int, params, ids, lengths, stops, key, num_steps):
    """The compiled body of `speculative_generate`: draft `lookahead` tokens at `draft_steps` iterations,
    verify them in one chunk at num_steps (traced), keep the agreeing prefix plus the verifier's token."""
    runner = _Runner(model, params, plan)
    batch, new, width = ids.shape[0], plan.max_new_tokens, lookahead
    max_len = ids.shape[1] + new + width
    fixed = ExitCriterion()
    k_state, k_sample = jax.random.split(jax.random.fold_in(key, 0))
    first, res = _prefill(runner, ids, lengths, k_state, max_len, num_steps, max(plan.cache_steps, draft_steps))
    token = plan.sampler(res.logits[:, 0], k_sample)
    tokens = jnp.full((batch, new + width + 1), -1, jnp.int32).at[:, 0].set(token)
    state = (jnp.ones((), jnp.int32), res.cache, token, jnp.ones((batch,), jnp.int32),
             jnp.isin(token, stops) | (new <= 1), tokens, jnp.zeros((batch,), jnp.int32))

    def round_(carry):
        r, cache, token, count, finished, tokens, rounds = carry
        active = ~finished
        base = first + lengths + count - 1  # buffer index of the last accepted token (not yet in the cache)
        keys = jax.random.split(jax.random.fold_in(key, r), 2 * width + 2)

        def draft(i, c):
            cache, token, drafts = c
            chunk = Chunk(start=base + i, real=jnp.ones((batch, 1), bool))
            res = runner.step(cache, token[:, None], chunk, (base + i - first)[:, None], active,
                              jnp.zeros((batch, 1), jnp.int32), keys[2 * i], num_steps=draft_steps, criterion=fixed)
            token = plan.sampler(res.logits[:, 0], keys[2 * i + 1])
            return res.cache, token, drafts.at[:, i].set(token)

        cache, _, drafts = jax.lax.fori_loop(0, width, draft, (cache, token, jnp.zeros((batch, width), jnp.int32)))
        cache = cache.truncate(base)  # the verifier recomputes the drafted positions
        inputs = jnp.concatenate([token[:, None], drafts[:, :-1]], axis=1)  # [batch, width]
        span = jnp.arange(width, dtype=jnp.int32)
        res = runner.step(cache, inputs, Chunk(start=base, real=jnp.ones((batch, width), bool)),
                          (base - first)[:, None] + span, active, jnp.broadcast_to(span, (batch, width)),
                          keys[-2], num_steps=num_steps, criterion=fixed)
        agree = jnp.cumprod(jnp.argmax(res.logits, axis=-1) == drafts, axis=1).sum(axis=1)  # [batch] in [0, width]
        at = jnp.minimum(agree, width - 1)[:, None]
        fix = plan.sampler(jnp.take_along_axis(res.logits, at[:, :, None], axis=1)[:, 0], keys[-1])
        proposal = jnp.concatenate([drafts, jnp.zeros((batch, 1), jnp.int32)], axis=1)
        proposal = jnp.where(jnp.arange(width + 1) == agree[:, None], fix[:, None], proposal)  # [batch, width + 1]
        accepted = jnp.where(agree < width, agree + 1, width)
        # Cut at the first stop token and at max_new_tokens.
        is_stop = jnp.isin(proposal, stops) & (jnp.arange(width + 1) < accepted[:, None])
        accepted = jnp.where(jnp.any(is_stop, axis=1), jnp.argmax(is_stop, axis=1) + 1, accepted)
        accepted = jnp.where(active, jnp.minimum(accepted, new - count), 0)
        rows, cols = jnp.arange(batch)[:, None], count[:, None] + jnp.arange(width + 1)
        keep = jnp.arange(width + 1)[None, :] < accepted[:, None]
        tokens = tokens.at[rows, jnp.where(keep, cols, tokens.shape[1])].set(proposal, mode="drop")
        cache = res.cache.truncate(jnp.where(active, base + accepted, base))
        last = jnp.take_along_axis(proposal, jnp.maximum(accepted - 1, 0)[:, None], axis=1)[:, 0]
        finished = finished | (active & jnp.any(is_stop & keep, axis=1))
        count = count + accepted
        finished = finished | (count >= new)
        return (r + 1, cache, jnp.where(active, last, token), count, finished, tokens,
                rounds + active.astype(jnp.int32))

    _, _, _, count, _, tokens, rounds = jax.lax.while_loop(lambda c: ~jnp.all(c[4]), round_, state)
    tokens = tokens[:, :new]
    return SpeculativeOutput(tokens=tokens, num_tokens=count, rounds=rounds)


_generate_jit = jax.jit(_generate, static_argnums=(0, 1))
_speculative_jit = jax.jit(_speculative, static_argnums=(0, 1, 2, 3))


# ---- input checking ------------------------------------------------------------------------------------
def _prompt_arrays(model: RecurrentDepthLM, prompts, lengths, padding_side: str, max_new_tokens: int):
    """Checks the prompts; returns (ids [batch, prompt_len] int32 padded on padding_side, lengths [batch],
    max_new_tokens as an int)."""
    cfg = model.config
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
    if isinstance(prompts, (list, tuple)):
        if lengths is not None:
            raise ValueError("lengths is only for prompts given as one padded array")
        if not prompts:
            raise ValueError("prompts is empty")
        rows = [np.asarray(p).reshape(-1) for p in prompts]
        if any(len(row) and not np.issubdtype(row.dtype, np.integer) for row in rows):
            raise ValueError("prompts must hold integer token ids")
        lengths = np.asarray([len(r) for r in rows], np.int64)
        ids = np.zeros((len(rows), max(1, int(lengths.max()))), np.int64)
        for i, row in enumerate(rows):
            if padding_side == "left":
                ids[i, ids.shape[1] - len(row):] = row
            else:
                ids[i, :len(row)] = row
    else:
        ids = np.asarray(prompts)
        if ids.ndim != 2:
            raise ValueError(f"prompts must be a list of token-id sequences or a [batch, length] array, "
                             f"got shape {ids.shape}")
        lengths = np.full(ids.shape[:1], ids.shape[1]) if lengths is None else np.asarray(lengths).reshape(-1)
        if lengths.shape != ids.shape[:1] or np.any(lengths > ids.shape[1]):
            raise ValueError(f"lengths must give one length <= {ids.shape[1]} per prompt, got {lengths}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"prompts must hold integer token ids, got dtype {ids.dtype}")
    if np.any(lengths < 1):
        raise ValueError(f"every prompt needs at least one token; prompt(s) {np.flatnonzero(lengths < 1).tolist()} "
                         f"are empty")
    if int(lengths.max()) + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt length {int(lengths.max())} + max_new_tokens {max_new_tokens} exceeds the "
                         f"model's context (max_seq_len={cfg.max_seq_len})")
    idx = np.arange(ids.shape[1])[None, :]
    real = idx >= ids.shape[1] - lengths[:, None] if padding_side == "left" else idx < lengths[:, None]
    bad = real & ((ids < 0) | (ids >= cfg.vocab_size))
    if np.any(bad):
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got {ids[bad].tolist()[:5]}")
    return jnp.asarray(np.where(real, ids, 0), jnp.int32), jnp.asarray(lengths, jnp.int32), max_new_tokens


def _stop_array(model: RecurrentDepthLM, stop_tokens) -> jax.Array:
    """Stop tokens as an int32 array padded with -1 to a multiple of 8 (so that their number rarely recompiles;
    -1 only ever meets the -1 of rows that have already finished)."""
    stop_tokens = [int(t) for t in stop_tokens]
    if any(not 0 <= t < model.config.vocab_size for t in stop_tokens):
        raise ValueError(f"stop tokens must lie in [0, {model.config.vocab_size}), got {stop_tokens}")
    return jnp.asarray(stop_tokens + [-1] * (max(8, -(-len(stop_tokens) // 8) * 8) - len(stop_tokens)), jnp.int32)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _plan(model: RecurrentDepthLM, max_new_tokens: int, num_steps, max_steps, init_scale, sampler, cache_strategy,
          padding_side, **rest) -> tuple[_Plan, jax.Array]:
    """Checks the settings shared by both generation functions; returns the static part of their compilation
    and num_steps for a traced argument."""
    cfg = model.config
    num_steps = _positive_int("num_steps", cfg.mean_recurrence if num_steps is None else num_steps)
    max_steps = num_steps if max_steps is None else _positive_int("max_steps", max_steps)
    if num_steps > max_steps:
        raise ValueError(f"num_steps ({num_steps}) exceeds max_steps ({max_steps})")
    init_scale = float(cfg.init_scale if init_scale is None else init_scale)
    if init_scale < 0:
        raise ValueError(f"init_scale must be >= 0, got {init_scale}")
    plan = _Plan(max_new_tokens=max_new_tokens, cache_steps=max_steps, init_scale=init_scale, sampler=sampler,
                 strategy=CacheStrategy.parse(cache_strategy), left_padded=padding_side == "left", **rest)
    return plan, np.int32(num_steps)  # numpy, not jax: a traced argument placed by jit, on any platform


# ---- public API ------------------------------------------------------------------------------------------
def generate(model: RecurrentDepthLM, params, prompts, *, max_new_tokens: int, lengths=None,
             num_steps: int | None = None, max_steps: int | None = None, init_scale: float | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, stop_tokens: Sequence[int] = (), seed: int = 0, cache_strategy: str = "full",
             padding_side: str = "left", continuous: bool = False, exit_criterion: str | None = None,
             exit_threshold: float | None = None, min_steps: int = 0, check_every: int = 1,
             return_logits: bool = False, stream: Callable | None = None) -> GenerateOutput:
    """Generates up to max_new_tokens tokens for each prompt with a KV cache, in one compiled loop.

    prompts: a list of token-id sequences (any lengths, padded on `padding_side`), or a [batch, length] int
      array padded on `padding_side` with `lengths` [batch] (default: no padding).
    num_steps: iterations of the core block per token (default config.mean_recurrence); with an exit
      criterion, the most a token may use.
    max_steps: the largest num_steps this compilation serves (default num_steps): the `full` cache has room for
      max_steps iterations per token, and a sweep over num_steps <= max_steps compiles once.
    init_scale: scale of the random initial state (default config.init_scale); 0 gives a zero state.
    temperature 0 is greedy; otherwise sampling with the optional top_k / top_p / min_p filters, from `seed`.
    stop_tokens: a sequence that emits one stops (the stop token is its last); the others go on.
    cache_strategy: 'full', 'compress-K', 'latest', 'latest-compress-K' (see recurrent_depth.kv_cache).
    continuous: each token's iterations start from the previous token's final state (after the final norm; the
      original's adaptive path carries the un-normalised state instead); the prompt starts from init_scale.
    exit_criterion: None (fixed depth) or one of 'entropy-diff', 'latent-diff', 'kl', 'minp-kl',
      'argmax-stability', 'cosine' (see recurrent_depth.exit_criteria), with exit_threshold (None: the
      original's default), checked after iteration min_steps + 1 and then every check_every iterations.
    stream: a host function `stream(tokens, num_tokens, steps)` called after every token with the output so far
      (numpy arrays shaped as GenerateOutput's; -1 where no token yet), e.g. to print tokens as they come; a new
      function compiles anew, so pass the same one each time.
    """
    if not isinstance(min_steps, int) or min_steps < 0:
        raise ValueError(f"min_steps must be a non-negative integer, got {min_steps!r}")
    if not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be a positive integer, got {check_every!r}")
    ids, lengths, max_new_tokens = _prompt_arrays(model, prompts, lengths, padding_side, max_new_tokens)
    plan, steps = _plan(model, max_new_tokens, num_steps, max_steps, init_scale,
                        Sampler(temperature, top_k, top_p, min_p), cache_strategy, padding_side,
                        continuous=bool(continuous), criterion=ExitCriterion.make(exit_criterion, exit_threshold),
                        min_steps=min_steps, check_every=check_every, return_logits=bool(return_logits),
                        stream=stream)
    return _generate_jit(model, plan, nn.meta.unbox(params), ids, lengths, _stop_array(model, stop_tokens),
                         jax.random.key(seed), steps)


def lower_generate(model: RecurrentDepthLM, params, batch_size: int, prompt_len: int, *, max_new_tokens: int,
                   num_steps: int | None = None, max_steps: int | None = None, init_scale: float | None = None,
                   cache_strategy: str = "full", exit_criterion: str | None = None,
                   exit_threshold: float | None = None, num_stop_tokens: int = 1, input_sharding=None,
                   replicated=None) -> jax.stages.Lowered:
    """`generate` (greedy, left padding) lowered for abstract inputs: params may be jax.ShapeDtypeStruct leaves
    with shardings, prompts are [batch_size, prompt_len] placed with `input_sharding`, scalars with
    `replicated` (NamedShardings, or None for the default device).  For ahead-of-time compilation, e.g. for a
    TPU slice from a CPU machine (recurrent_depth.aot); call under the mesh and logical-axis rules the model's
    activations should be sharded with."""
    if prompt_len + max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"prompt_len {prompt_len} + max_new_tokens {max_new_tokens} exceeds the model's context "
                         f"(max_seq_len={model.config.max_seq_len})")
    plan, steps = _plan(model, _positive_int("max_new_tokens", max_new_tokens), num_steps, max_steps, init_scale,
                        Sampler(0.0, None, None, None), cache_strategy, "left",
                        criterion=ExitCriterion.make(exit_criterion, exit_threshold))
    spec = lambda shape, dtype, sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
    stops = -(-max(num_stop_tokens, 1) // 8) * 8
    rows = input_sharding and jax.sharding.NamedSharding(input_sharding.mesh, jax.sharding.PartitionSpec(
        input_sharding.spec[0]))  # lengths [batch]: sharded like the prompts' rows
    key = spec((), jax.eval_shape(jax.random.key, 0).dtype, replicated)
    return _generate_jit.lower(model, plan, nn.meta.unbox(params),
                               spec((batch_size, prompt_len), jnp.int32, input_sharding),
                               spec((batch_size,), jnp.int32, rows), spec((stops,), jnp.int32, replicated), key,
                               spec((), jnp.int32, replicated))


def speculative_generate(model: RecurrentDepthLM, params, prompts, *, max_new_tokens: int, lengths=None,
                         num_steps: int | None = None, max_steps: int | None = None, draft_steps: int = 4,
                         lookahead: int = 4, init_scale: float | None = None, temperature: float = 0.0,
                         top_k: int | None = None,
                         top_p: float | None = None, min_p: float | None = None, stop_tokens: Sequence[int] = (),
                         seed: int = 0, cache_strategy: str = "full",
                         padding_side: str = "left") -> SpeculativeOutput:
    """Self-speculative decoding: the same model drafts `lookahead` tokens at `draft_steps` iterations each,
    then verifies them in one pass at `num_steps`; each sequence keeps its drafted tokens up to the first one
    the verifier's argmax disagrees with, plus the verifier's own token there.  Verifier cache entries replace
    the drafts'.  With greedy decoding and the 'full' cache the output equals `generate` at num_steps.
    Other arguments as in `generate`.
    """
    draft_steps, lookahead = _positive_int("draft_steps", draft_steps), _positive_int("lookahead", lookahead)
    ids, lengths, max_new_tokens = _prompt_arrays(model, prompts, lengths, padding_side, max_new_tokens)
    plan, steps = _plan(model, max_new_tokens, num_steps, max_steps, init_scale,
                        Sampler(temperature, top_k, top_p, min_p), cache_strategy, padding_side)
    return _speculative_jit(model, plan, draft_steps, lookahead, nn.meta.unbox(params), ids, lengths,
                            _stop_array(model, stop_tokens), jax.random.key(seed), steps)
