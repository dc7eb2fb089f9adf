"""Parallel ("diffusion-style") sampling: the positions of a window iterate together, the original's
`generate_diffusion_style` ("Efficient Parallel Samplers for Recurrent-Depth Models", arXiv 2510.14961).

A prefill runs the prompt at num_steps iterations; its last logits give the first token, final at once.  Then each
outer step works on a window of positions that starts at the last final token (whose logits give the next one):
  1. the prelude embeds the window's tokens; each position's embedding is an EMA over the outer steps (embed_ema);
  2. each state is mixed with a fresh initial-state draw by noise_mixing / (1 + iterations the position had);
  3. inner_steps core iterations run over the whole window at once (attending to the final prefix's cache entries
     and causally within the window); the coda then gives a tentative token after every window position;
  4. `headway` new positions join the window (at most max_wavefront), with fresh states;
  5. a prefix of the window becomes final: `latent-diff` up to the last position whose state moved by less than
     exit_threshold of its norm, `token-stability` up to the last position whose tentative token was unchanged
     in more than num_steps // inner_steps outer steps (counted, not necessarily in a row), `fixed` `headway`
     positions per step after num_steps // inner_steps steps.  The cache keeps the entries of final positions;
     the window's are rewritten at the next step.
A sequence ends when max_new_tokens are final, or, after num_steps outer steps, when a final token is a stop
token (the output ends at the first one, as `generate`'s; the original only checks newly frozen tokens and may
return tokens past an earlier stop token).

Batched and compiled: every row has its own window, frozen prefix and stop state in one `while_loop`; the window
is a buffer of max_wavefront states with masks, and each outer step runs the smallest of a few widths (8, 16, 32,
..., max_wavefront) that holds every row's window.  Only the shapes, max_wavefront, the cache strategy, the sampler,
init_scale and padding side are compiled in: the other settings are traced.  Prompt handling, the KV cache and
sampling are the other samplers' (decoding.plan, decoding.passes).

Where the original's code and its description differ, this follows the code (fixture parity): a new position's
embedding is (1 - embed_ema) times its own; the latent-diff comparison after a freeze of d positions pairs each
state with the previous step's state d positions further on (the original slices already-trimmed states).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from recurrent_depth.decoding.kv_cache import Chunk, KVCache
from recurrent_depth.decoding.passes import ChunkPass, Runner, emit, prefill, row_keys
from recurrent_depth.decoding.plan import Plan, make_plan, positive_int, prompt_arrays, stop_array
from recurrent_depth.decoding.sampling import Sampler
from recurrent_depth.model.lm import RecurrentDepthLM

FREEZE_STRATEGIES = ("latent-diff", "token-stability", "fixed")


@flax.struct.dataclass
class ParallelOutput:
    tokens: jax.Array  # [batch, max_new_tokens] int32 final tokens; -1 after a stop token or if never final
    num_tokens: jax.Array  # [batch] int32 tokens returned, a final stop token included
    steps: jax.Array  # [batch, max_new_tokens] iterations behind each token, as GenerateOutput.steps: the
    #   prefill's num_steps for the first, then the iterations of the position before it (0 past the end)
    iterations: jax.Array  # [batch, max_new_tokens] core iterations the position of each token received (its
    #   logits gave the next token); the original's recurrence_per_position less the prefill it counts at the first
    outer_steps: jax.Array  # [batch] int32 outer steps each sequence took

    @property
    def steps_per_sequence(self):
        """[batch] core iterations over all positions of each sequence's tokens (the prompt's prefill once)."""
        return self.steps.sum(axis=-1)


@dataclasses.dataclass(frozen=True)
class _Settings:
    """Static settings of one compiled parallel generation."""

    base: Plan  # prompt layout, cache strategy, sampler, init scale (shared with decoding)
    window: int  # the window buffer: max_wavefront, at most the context

    @property
    def widths(self) -> tuple[int, ...]:
        """The window widths an outer step may run at."""
        sizes = [w for w in (8 * 2 ** k for k in range(16)) if w < self.window]
        return (*sizes, self.window)


@flax.struct.dataclass
class _Window:
    """The loop's carry; positions are buffer indices, `start` [batch] is the window's first (the last final)."""

    step: jax.Array  # int32 outer step (all rows start together)
    cache: KVCache
    seq: jax.Array  # [batch, buf] tokens: final up to `start`, tentative in the window
    start: jax.Array  # [batch]
    size: jax.Array  # [batch] window positions
    states: jax.Array  # [batch, window, embed] the window's states (index i: position start + i)
    embeds: jax.Array  # [batch, window, embed] the previous step's (EMA) embeddings, aligned with the window
    matched: jax.Array  # [batch] window positions that have a previous embedding
    shift: jax.Array  # [batch] how far the window moved at the previous step (see the module: latent-diff)
    iters: jax.Array  # [batch, buf] core iterations per position
    stable: jax.Array  # [batch, buf] steps in which a position's token did not change (token-stability)
    done: jax.Array  # [batch] bool
    outer: jax.Array  # [batch] outer steps taken
    num_final: jax.Array  # [batch] final new tokens so far (up to a stop token and max_new_tokens)


def _shift(x, by):
    """x [batch, n, ...] moved left by `by` [batch] positions (x[:, i + by]; the tail repeats the last entry)."""
    idx = jnp.minimum(jnp.arange(x.shape[1])[None, :] + by[:, None], x.shape[1] - 1)
    return jnp.take_along_axis(x, idx.reshape(*idx.shape, *(1,) * (x.ndim - 2)), axis=1)


def _last_true(mask):
    """(any [batch], index of the last True [batch], 0 if none) of mask [batch, n]."""
    n = mask.shape[1]
    return jnp.any(mask, axis=1), jnp.where(jnp.any(mask, axis=1), n - 1 - jnp.argmax(mask[:, ::-1], axis=1), 0)


def _final_tokens(seq, first_new, last_final, stops, max_new: int):
    """(tokens [batch, max_new] with -1 where not final or after the first stop token, their count, stopped)."""
    idx = first_new[:, None] + jnp.arange(max_new)
    tokens = jnp.take_along_axis(seq, jnp.minimum(idx, seq.shape[1] - 1), axis=1)
    final = idx <= last_final[:, None]
    is_stop = jnp.isin(tokens, stops) & final
    keep = final & (jnp.cumsum(is_stop, axis=1) - is_stop == 0)  # up to and including the first stop token
    return jnp.where(keep, tokens, -1), keep.sum(axis=1, dtype=jnp.int32), jnp.any(is_stop, axis=1)


def _token_iterations(iters, first_new, tokens, num_steps):
    """(iterations, steps) [batch, max_new] of ParallelOutput for the final `tokens`, from iters [batch, buf]."""
    batch, new = tokens.shape
    j = jnp.arange(new)[None, :]
    at = jnp.take_along_axis(iters, jnp.minimum(first_new[:, None] + j, iters.shape[1] - 1), axis=1)
    iterations = jnp.where(tokens >= 0, at - jnp.where(j == 0, num_steps, 0), 0)
    steps = jnp.where(tokens >= 0, jnp.concatenate([jnp.full((batch, 1), num_steps), iterations[:, :-1]], 1), 0)
    return iterations, steps.astype(jnp.int32)


class _Pass:
    """One outer step's forward pass over a window of a static width (steps 1-3 of the module docstring)."""

    def __init__(self, runner: Runner, settings: _Settings, first, knobs):
        self.runner, self.s, self.first, self.knobs = runner, settings, first, knobs

    def __call__(self, width: int, win: _Window, active, k_noise, k_sample):
        """Returns (cache, states, embeddings, tokens) padded to the window buffer; tokens[:, i] follows window
        position i."""
        runner, s, ema, mixing = self.runner, self.s, self.knobs["ema"], self.knobs["mixing"]
        i = jnp.arange(width)
        pos = win.start[:, None] + i  # [batch, width]
        buf = win.seq.shape[1]
        ids = jnp.take_along_axis(win.seq, jnp.minimum(pos, buf - 1), axis=1)
        chunk = Chunk(start=win.start, real=i[None, :] < win.size[:, None])
        cache, e, cos, sin = runner.prelude(win.cache, ids, chunk, pos - self.first[:, None], active)
        # The original's first step mixes the new token's embedding with its prelude over the whole sequence (the same).
        previous = jnp.where(win.step == 0, e, win.embeds[:, :width])
        matched = (i[None, :] < win.matched[:, None])[..., None]
        embeds = e * (1 - ema) + jnp.where(matched, previous * ema, 0)
        had = jnp.take_along_axis(win.iters, jnp.minimum(pos, buf - 1), axis=1)
        mix = (mixing / (1 + had).astype(jnp.float32))[..., None].astype(e.dtype)
        noise = runner.apply(RecurrentDepthLM.initial_state, e, s.base.init_scale, rngs={"state": k_noise})
        state = win.states[:, :width] * (1 - mix) + mix * noise
        chunk_pass = ChunkPass(runner, chunk, cos, sin, runner.apply(RecurrentDepthLM.inject, embeds),
                                jnp.broadcast_to(i, pos.shape))
        state, cache = jax.lax.fori_loop(0, self.knobs["inner_steps"],
                                         lambda j, c: chunk_pass.iterate(j, *c, active), (state, cache))
        logits, _, cache = chunk_pass.coda(cache, state, active)
        tokens = s.base.sampler(logits, k_sample)
        pad = lambda x: jnp.pad(x, [(0, 0), (0, s.window - width)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        return cache, pad(state), pad(embeds), pad(tokens)


def _parallel(model, s: _Settings, params, ids, lengths, stops, key, knobs):
    """The compiled body of `parallel_generate`; knobs: the traced settings (see parallel_generate)."""
    runner = Runner(model, params, s.base)
    cfg, new, h, inner = model.config, s.base.max_new_tokens, knobs["headway"], knobs["inner_steps"]
    batch, prompt_len = ids.shape
    buf = min(prompt_len + new + s.window, prompt_len + cfg.max_seq_len)
    num_steps = knobs["num_steps"]
    k_state, k_sample, k_window = jax.random.split(jax.random.fold_in(key, 0), 3)
    first, res = prefill(runner, ids, lengths, row_keys(k_state, batch), buf, s.base.rows(batch, num_steps))
    first_new = first + lengths  # buffer index of the first new token
    end = jnp.minimum(buf, first + cfg.max_seq_len)  # window positions stay below this (the context)
    token = s.base.sampler(res.logits[:, 0], k_sample)
    rows, idx = jnp.arange(batch)[:, None], jnp.arange(buf)[None, :]
    seq = jnp.zeros((batch, buf), jnp.int32).at[:, :prompt_len].set(ids).at[rows[:, 0], first_new].set(token)
    zeros = jnp.zeros((batch, s.window, cfg.hidden_size), cfg.stream_dtype)
    init = _Window(
        step=jnp.zeros((), jnp.int32), cache=res.cache, seq=seq, start=first_new, size=jnp.ones((batch,), jnp.int32),
        states=runner.apply(RecurrentDepthLM.initial_state, zeros, s.base.init_scale, rngs={"state": k_window}),
        embeds=zeros, matched=jnp.ones((batch,), jnp.int32), shift=lengths,  # step 0 has no previous states
        iters=jnp.where((idx >= first[:, None]) & (idx <= first_new[:, None]), num_steps, 0).astype(jnp.int32),
        stable=jnp.zeros((batch, buf), jnp.int32), done=jnp.full((batch,), new <= 1),
        outer=jnp.zeros((batch,), jnp.int32), num_final=jnp.ones((batch,), jnp.int32))
    window_pass = _Pass(runner, s, first, knobs)
    widths = jnp.asarray(s.widths)
    threshold_steps = num_steps // inner
    i = jnp.arange(s.window)[None, :]

    def body(win: _Window) -> _Window:
        active = ~win.done
        k_noise, k_new, k_sample, k_extra = jax.random.split(jax.random.fold_in(key, win.step + 1), 4)
        branch = jnp.searchsorted(widths, jnp.max(jnp.where(active, win.size, 1)))
        cache, states, embeds, tokens = jax.lax.switch(
            branch, [lambda *a, w=w: window_pass(w, *a) for w in s.widths], win, active, k_noise, k_sample)
        start, size = win.start[:, None], win.size[:, None]
        in_window = (idx >= start) & (idx < start + size) & active[:, None]
        iters = win.iters + inner * in_window
        # Tentative tokens: position start + 1 + j gets tokens[:, j]; the stability count compares them first.
        tentative = jnp.take_along_axis(tokens, jnp.clip(idx - start - 1, 0, s.window - 1), axis=1)
        proposal = jnp.where(idx <= start, win.seq, tentative)
        stable = win.stable + ((idx >= first[:, None]) & (idx < start + size) & active[:, None]
                               & (proposal == win.seq))
        # Headway: new positions join, as many as the window (and the context) has room for.
        room = jnp.minimum(s.window, end - win.start)
        joined = jnp.clip(jnp.minimum(h, room - win.size), 0)
        grown = (win.size + joined)[:, None]
        seq = jnp.where(active[:, None] & (idx > start) & (idx < start + grown), proposal, win.seq)
        extra = jax.random.randint(k_extra, seq.shape, 0, cfg.vocab_size, jnp.int32)  # the original's extra
        seq = jnp.where(active[:, None] & (idx > start + size) & (idx < start + grown), extra, seq)  # (headway > 1)
        fresh = runner.apply(RecurrentDepthLM.initial_state, zeros, s.base.init_scale, rngs={"state": k_new})
        states = jnp.where(((i >= size) & (i < grown))[..., None], fresh, states)
        # Freezing: the window moves on by `by` positions, whose tokens become final.
        # (all three strategies are cheap next to the pass: one compilation serves them all)
        previous = _shift(win.states, win.shift)
        change = jnp.linalg.norm(states - previous, axis=-1) / jnp.linalg.norm(states, axis=-1)
        _, by_latent = _last_true((i < size - win.shift[:, None]) & (change < knobs["threshold"]) & active[:, None])
        counts = jnp.take_along_axis(stable, jnp.minimum(start + i, stable.shape[1] - 1), axis=1)
        _, by_stable = _last_true((i < size) & (counts > threshold_steps) & active[:, None])
        by_fixed = jnp.where(active & (win.step > threshold_steps), jnp.minimum(h, grown[:, 0] - 1), 0)
        by = jnp.stack([by_latent, by_stable, by_fixed])[knobs["freeze"]]
        last_final = win.start + by
        final, num_final, stopped = _final_tokens(seq, first_new, last_final, stops, new)
        emit(s.base, final, _token_iterations(iters, first_new, final, num_steps)[1])
        done = win.done | (active & ((last_final + 1 - first_new >= new) | ((win.step > num_steps) & stopped)))
        return _Window(step=win.step + 1, cache=cache.truncate(last_final), seq=seq, start=last_final,
                       size=grown[:, 0] - by, states=_shift(states, by), embeds=_shift(embeds, by),
                       matched=win.size - by, shift=by, iters=iters, stable=stable, done=done,
                       outer=win.outer + active, num_final=num_final)

    def cond(win: _Window):
        return ~jnp.all(win.done) & (win.step < knobs["max_outer"])

    win = jax.lax.while_loop(cond, body, init)
    tokens, num_tokens, _ = _final_tokens(win.seq, first_new, win.start, stops, new)
    iterations, steps = _token_iterations(win.iters, first_new, tokens, num_steps)
    return ParallelOutput(tokens=tokens, num_tokens=num_tokens, steps=steps, iterations=iterations,
                          outer_steps=win.outer)


_parallel_jit = jax.jit(_parallel, static_argnums=(0, 1))


def _fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def parallel_generate(model: RecurrentDepthLM, params, prompts, *, max_new_tokens: int, lengths=None,
                      max_wavefront: int = 128, inner_steps: int = 4, headway: int = 1, embed_ema: float = 0.1,
                      noise_mixing: float = 0.5, freeze: str = "latent-diff", exit_threshold: float = 0.03,
                      num_steps: int | None = None, init_scale: float | None = None,
                      cache_strategy: str = "latest-m4-compress-s4", temperature: float = 0.0,
                      top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                      stop_tokens: Sequence[int] = (), seed: int = 0, padding_side: str = "left",
                      max_outer_steps: int = 4096, stream: Callable | None = None) -> ParallelOutput:
    """Generates up to max_new_tokens tokens per prompt with the parallel sampler (see the module docstring).

    prompts, lengths, padding_side, init_scale, temperature / top_k / top_p / min_p, seed, stop_tokens and
      cache_strategy as in `decoding.generate` (the cache default is the original's 'latest-m4-compress-s4').
    num_steps: iterations of the prompt's prefill (default config.mean_recurrence); num_steps // inner_steps
      outer steps pass before token-stability or fixed freezing starts, and num_steps before a stop token ends.
    max_wavefront: most positions in the window; inner_steps: core iterations per outer step; headway: positions
      that join the window per outer step (the extra ones beyond the first with random tokens).
    embed_ema: weight of a position's previous embedding; noise_mixing: weight of a fresh state draw, divided by
      1 + the iterations the position has had.
    freeze: 'latent-diff' (with exit_threshold), 'token-stability' or 'fixed'.
    max_outer_steps: a bound on the outer steps (the original's max_diffusion_steps); unfinished sequences
      return the tokens that are final by then.
    stream: as in `decoding.generate`, called after every outer step with the tokens final so far.
    """
    ids, lengths, max_new_tokens = prompt_arrays(model, prompts, lengths, padding_side, max_new_tokens)
    max_wavefront = positive_int("max_wavefront", max_wavefront)
    inner_steps = positive_int("inner_steps", inner_steps)
    headway = positive_int("headway", headway)
    if headway > max_wavefront:
        raise ValueError(f"headway ({headway}) exceeds max_wavefront ({max_wavefront})")
    if freeze not in FREEZE_STRATEGIES:
        raise ValueError(f"unknown freeze strategy {freeze!r}; expected one of {FREEZE_STRATEGIES}")
    if isinstance(exit_threshold, bool) or not isinstance(exit_threshold, (int, float, np.number)) \
            or not exit_threshold >= 0:
        raise ValueError(f"exit_threshold must be a non-negative number, got {exit_threshold!r}")
    num_steps = positive_int("num_steps", model.config.mean_recurrence if num_steps is None else num_steps)
    base, steps = make_plan(model, max_new_tokens, num_steps, max(num_steps, inner_steps), init_scale,
                        Sampler(temperature, top_k, top_p, min_p), cache_strategy, padding_side, stream=stream)
    if base.strategy.slots is not None:  # a ring of slots: one compilation for every num_steps and inner_steps
        base = dataclasses.replace(base, cache_steps=1)
    settings = _Settings(base=base, window=min(max_wavefront, model.config.max_seq_len))
    knobs = dict(num_steps=steps, inner_steps=np.int32(inner_steps), headway=np.int32(headway),
                 freeze=np.int32(FREEZE_STRATEGIES.index(freeze)), ema=np.float32(_fraction("embed_ema", embed_ema)),
                 mixing=np.float32(_fraction("noise_mixing", noise_mixing)), threshold=np.float32(exit_threshold),
                 max_outer=np.int32(positive_int("max_outer_steps", max_outer_steps)))
    return _parallel_jit(model, settings, nn.meta.unbox(params), ids, lengths, stop_array(model, stop_tokens),
                         jax.random.key(seed), knobs)
