"""Compiled generation: KV cache, per-token adaptive exit, continuous thinking, self-speculative decoding.

Everything after input checking runs in one jitted function per shape and setting: the prompt is one forward
pass (a "chunk"), then a `lax.while_loop` produces one token per step.  Each chunk runs the prelude once, then
the core block one iteration at a time (another `while_loop`), so that every sequence can stop iterating on its
own (adaptive exit); rows that stopped, or whose sequence finished, store no cache entries from then on.

Prompts sit in one buffer of `prompt_len + max_new_tokens` positions per row, padded on the left (generation
then writes the same column in every row) or on the right; RoPE positions count from each row's first token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from recurrent_depth.decoding.exit_criteria import ExitCriterion
from recurrent_depth.decoding.kv_cache import Chunk
from recurrent_depth.decoding.passes import Runner, emit, prefill, row_keys, token_keys
from recurrent_depth.decoding.plan import Plan, RowSettings, make_plan, positive_int, prompt_arrays, stop_array
from recurrent_depth.decoding.sampling import Sampler
from recurrent_depth.model.lm import RecurrentDepthLM


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


def _generate(model, plan: Plan, params, ids, lengths, stops, key, rows: RowSettings):
    """The compiled body of `generate`: prefill, then one token per while_loop step.  Row r's token n draws with
    token_keys(fold_in(key, r), n); the settings `rows` are traced (every row gets the plan's)."""
    runner = Runner(model, params, plan)
    batch, new = ids.shape[0], plan.max_new_tokens
    max_len = ids.shape[1] + new
    keys = row_keys(key, batch)
    sample = lambda logits, k: rows.sampling(logits, k, plan.sample_like)  # noqa: E731
    k_state, k_sample = token_keys(keys, 0)
    first, res = prefill(runner, ids, lengths, k_state, max_len, rows)
    token = sample(res.logits[:, 0], k_sample)
    out = dict(tokens=jnp.full((batch, new), -1, jnp.int32).at[:, 0].set(token),
               steps=jnp.zeros((batch, new), jnp.int32).at[:, 0].set(res.steps))
    if plan.return_logits:
        out["logits"] = jnp.zeros((batch, new, model.config.vocab_size), jnp.float32).at[:, 0].set(res.logits[:, 0])
    finished = jnp.isin(token, stops)
    start = first + lengths  # buffer index of the first generated token
    emit(plan, out["tokens"], out["steps"])

    def body(carry):
        n, cache, token, latent, finished, out = carry
        k_state, k_sample = token_keys(keys, n)
        chunk = Chunk(start=start + n - 1, real=jnp.ones((batch, 1), bool))
        rope = (lengths + n - 1)[:, None]
        res = runner.step(cache, jnp.maximum(token, 0)[:, None], chunk, rope, ~finished,
                          jnp.zeros((batch, 1), jnp.int32), k_state, rows, state=latent)
        token = jnp.where(finished, -1, sample(res.logits[:, 0], k_sample))
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


def _speculative(model, plan: Plan, draft_steps: int, lookahead: int, params, ids, lengths, stops, key, num_steps):
    """The compiled body of `speculative_generate`: draft `lookahead` tokens at `draft_steps` iterations,
    verify them in one chunk at num_steps (traced), keep the agreeing prefix plus the verifier's token."""
    runner = Runner(model, params, plan)  # (fixed depth: the plan has no exit criterion)
    batch, new, width = ids.shape[0], plan.max_new_tokens, lookahead
    max_len = ids.shape[1] + new + width
    verifying = plan.rows(batch, num_steps)
    drafting = verifying.replace(num_steps=jnp.full((batch,), draft_steps, jnp.int32))
    k_state, k_sample = jax.random.split(jax.random.fold_in(key, 0))
    first, res = prefill(runner, ids, lengths, row_keys(k_state, batch), max_len, verifying,
                         max(plan.cache_steps, draft_steps))
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
                              jnp.zeros((batch, 1), jnp.int32), row_keys(keys[2 * i], batch), drafting)
            token = plan.sampler(res.logits[:, 0], keys[2 * i + 1])
            return res.cache, token, drafts.at[:, i].set(token)

        cache, _, drafts = jax.lax.fori_loop(0, width, draft, (cache, token, jnp.zeros((batch, width), jnp.int32)))
        cache = cache.truncate(base)  # the verifier recomputes the drafted positions
        inputs = jnp.concatenate([token[:, None], drafts[:, :-1]], axis=1)  # [batch, width]
        span = jnp.arange(width, dtype=jnp.int32)
        res = runner.step(cache, inputs, Chunk(start=base, real=jnp.ones((batch, width), bool)),
                          (base - first)[:, None] + span, active, jnp.broadcast_to(span, (batch, width)),
                          row_keys(keys[-2], batch), verifying)
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
    temperature 0 is greedy; otherwise sampling with the optional top_k / top_p / min_p filters, from `seed`:
      row r's randomness (its sampling and its random initial states) comes from fold_in(key(seed), r) and the
      token's index only, so a prompt's output does not depend on the other prompts (the serving engine gives
      each request the key of row 0).
    stop_tokens: a sequence that emits one stops (the stop token is its last); the others go on.
    cache_strategy: 'full', 'compress-K', 'latest', 'latest-compress-K' (see recurrent_depth.decoding.kv_cache).
    continuous: each token's iterations start from the previous token's final state (after the final norm; the
      original's adaptive path carries the un-normalised state instead); the prompt starts from init_scale.
    exit_criterion: None (fixed depth) or one of 'entropy-diff', 'latent-diff', 'kl', 'minp-kl',
      'argmax-stability', 'cosine' (see recurrent_depth.decoding.exit_criteria), with exit_threshold (None: the
      original's default), checked after iteration min_steps + 1 and then every check_every iterations.
    stream: a host function `stream(tokens, num_tokens, steps)` called after every token with the output so far
      (numpy arrays shaped as GenerateOutput's; -1 where no token yet), e.g. to print tokens as they come; a new
      function compiles anew, so pass the same one each time.
    """
    if not isinstance(min_steps, int) or min_steps < 0:
        raise ValueError(f"min_steps must be a non-negative integer, got {min_steps!r}")
    if not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be a positive integer, got {check_every!r}")
    ids, lengths, max_new_tokens = prompt_arrays(model, prompts, lengths, padding_side, max_new_tokens)
    plan, steps = make_plan(model, max_new_tokens, num_steps, max_steps, init_scale,
                        Sampler(temperature, top_k, top_p, min_p), cache_strategy, padding_side,
                        continuous=bool(continuous), criterion=ExitCriterion.make(exit_criterion, exit_threshold),
                        min_steps=min_steps, check_every=check_every, return_logits=bool(return_logits),
                        stream=stream)
    return _generate_jit(model, plan, nn.meta.unbox(params), ids, lengths, stop_array(model, stop_tokens),
                         jax.random.key(seed), plan.rows(ids.shape[0], steps))


def lower_generate(model: RecurrentDepthLM, params, batch_size: int, prompt_len: int, *, max_new_tokens: int,
                   num_steps: int | None = None, max_steps: int | None = None, init_scale: float | None = None,
                   cache_strategy: str = "full", exit_criterion: str | None = None,
                   exit_threshold: float | None = None, num_stop_tokens: int = 1, input_sharding=None,
                   replicated=None) -> jax.stages.Lowered:
    """`generate` (greedy, left padding) lowered for abstract inputs: params may be jax.ShapeDtypeStruct leaves
    with shardings, prompts are [batch_size, prompt_len] placed with `input_sharding`, scalars with
    `replicated` (NamedShardings, or None for the default device).  For ahead-of-time compilation, e.g. for a
    TPU slice from a CPU machine (recurrent_depth.cli.aot); call under the mesh and logical-axis rules the model's
    activations should be sharded with."""
    if prompt_len + max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"prompt_len {prompt_len} + max_new_tokens {max_new_tokens} exceeds the model's context "
                         f"(max_seq_len={model.config.max_seq_len})")
    plan, steps = make_plan(model, positive_int("max_new_tokens", max_new_tokens), num_steps, max_steps, init_scale,
                        Sampler(0.0, None, None, None), cache_strategy, "left",
                        criterion=ExitCriterion.make(exit_criterion, exit_threshold))
    spec = lambda shape, dtype, sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
    stops = -(-max(num_stop_tokens, 1) // 8) * 8
    rows = input_sharding and jax.sharding.NamedSharding(input_sharding.mesh, jax.sharding.PartitionSpec(
        input_sharding.spec[0]))  # lengths [batch]: sharded like the prompts' rows
    key = spec((), jax.eval_shape(jax.random.key, 0).dtype, replicated)
    settings = jax.tree.map(lambda x: spec(x.shape, x.dtype, rows), plan.rows(batch_size, steps))
    return _generate_jit.lower(model, plan, nn.meta.unbox(params),
                               spec((batch_size, prompt_len), jnp.int32, input_sharding),
                               spec((batch_size,), jnp.int32, rows), spec((stops,), jnp.int32, replicated), key,
                               settings)


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
    draft_steps, lookahead = positive_int("draft_steps", draft_steps), positive_int("lookahead", lookahead)
    ids, lengths, max_new_tokens = prompt_arrays(model, prompts, lengths, padding_side, max_new_tokens)
    plan, steps = make_plan(model, max_new_tokens, num_steps, max_steps, init_scale,
                        Sampler(temperature, top_k, top_p, min_p), cache_strategy, padding_side)
    return _speculative_jit(model, plan, draft_steps, lookahead, nn.meta.unbox(params), ids, lengths,
                            stop_array(model, stop_tokens), jax.random.key(seed), steps)
