"""Cached generation: parity with the original (fixtures/README.md), batching, exits, speculative decoding.

Compilation dominates the run time, so generations are computed once per setting (module fixture `runs`) and
shared by the tests; every setting uses the same few prompt shapes.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_depth import generate, speculative_generate
from recurrent_depth.checkpoint.huggingface import from_huggingface
from recurrent_depth.decoding.exit_criteria import DEFAULT_THRESHOLDS, ExitCriterion
from recurrent_depth.decoding.kv_cache import CacheStrategy, Chunk, KVCache
from recurrent_depth.decoding.sampling import Sampler
from recurrent_depth.runtime.sharding import DEFAULT_RULES, make_mesh

from helpers import TINY, TINY_242, assert_close

GEN = np.load(TINY / "generate.npz")
KV = np.load(TINY_242 / "generate_kv.npz")
PROMPT_LEN = 13  # the padded prompt width every tiny-model run uses
_rng = np.random.default_rng(0)
# The fixture prompt (10 tokens), a shorter and a longer one.
PROMPTS = [GEN["prompt"][0].tolist(), _rng.integers(0, 512, 6).tolist(), _rng.integers(0, 512, PROMPT_LEN).tolist()]
OTHER_242 = _rng.integers(0, 512, 13).tolist()  # shares the batch with the huginn-tiny-242 fixture prompt

# name -> generate() settings for the tiny model (prelude 2, core 2, coda 1).
SETTINGS = {
    "full": dict(num_steps=4, cache_strategy="full", max_new_tokens=12),
    "compress-2": dict(num_steps=4, cache_strategy="compress-2", max_new_tokens=8),
    "full-kl": dict(num_steps=8, cache_strategy="full", exit_criterion="kl",
                    exit_threshold=float(GEN["adaptive_kl_threshold"]), max_new_tokens=12),
    "latest-entropy": dict(num_steps=8, cache_strategy="latest", exit_criterion="entropy-diff",
                           exit_threshold=0.01, max_new_tokens=8),
    "compress-3-latent": dict(num_steps=8, cache_strategy="compress-3", exit_criterion="latent-diff",
                              exit_threshold=0.1, max_new_tokens=8),
    "latest-compress-6-argmax": dict(num_steps=8, cache_strategy="latest-compress-6",
                                     exit_criterion="argmax-stability", exit_threshold=2, min_steps=1,
                                     max_new_tokens=8),
}


def _padded(prompt):
    """One prompt alone, left-padded to PROMPT_LEN: (ids [1, PROMPT_LEN], lengths [1])."""
    ids = np.zeros((1, PROMPT_LEN), np.int32)
    ids[0, PROMPT_LEN - len(prompt):] = prompt
    return ids, [len(prompt)]


@pytest.fixture(scope="module")
def runs(tiny):
    """Generations of the tiny model, computed on first use: runs(name, layout) with layout 'batch' (the three
    prompts, left padding), 'right' (the same, right padding) or 'alone' (each prompt alone, a list of three)."""
    model, params = tiny
    cache = {}

    def get(name, layout="batch"):
        if (name, layout) not in cache:
            kw = dict(SETTINGS[name], init_scale=0.0, return_logits=True)
            if layout == "alone":
                out = [generate(model, params, ids, lengths=lengths, **kw) for ids, lengths in map(_padded, PROMPTS)]
            else:
                out = generate(model, params, PROMPTS, padding_side="left" if layout == "batch" else "right", **kw)
            cache[name, layout] = out
        return cache[name, layout]

    return get


@pytest.fixture(scope="module")
def tiny_242():
    return from_huggingface(TINY_242 / "checkpoint")


# ---- parity with the original ------------------------------------------------------------------------
def test_greedy_generation_matches_original(runs):
    out = runs("full")
    np.testing.assert_array_equal(out.tokens[0], GEN["greedy"][0, 10:])
    assert_close(out.logits[0], GEN["greedy_logits"][0], name="greedy_logits")
    assert np.all(np.asarray(out.steps) == 4) and list(out.num_tokens) == [12, 12, 12]
    assert list(out.steps_per_sequence) == [48, 48, 48]


def test_adaptive_kl_exit_matches_original(runs):
    out = runs("full-kl")
    np.testing.assert_array_equal(out.tokens[0], GEN["adaptive_kl"][0, 10:])
    np.testing.assert_array_equal(out.steps[0], GEN["adaptive_kl_steps"])
    assert_close(out.logits[0], GEN["adaptive_kl_logits"][0], name="adaptive_kl_logits")


def test_continuous_thinking_matches_original(tiny):
    model, params = tiny
    out = generate(model, params, GEN["prompt"].tolist(), max_new_tokens=12, num_steps=4, init_scale=0.0,
                   continuous=True, return_logits=True)
    np.testing.assert_array_equal(out.tokens[0], GEN["greedy_continuous"][0, 10:])
    assert_close(out.logits[0], GEN["greedy_continuous_logits"][0], name="greedy_continuous_logits")


@pytest.mark.parametrize("name, strategy, num_steps, criterion", [
    ("greedy_full", "full", 6, None),
    ("greedy_compress-s4", "compress-s4", 6, None),
    ("greedy_latest-m4-compress-s8", "latest-m4-compress-s8", 6, None),
    ("adaptive_kl_latest-m4", "latest-m4", int(KV["adaptive_kl_max_steps"]), "kl"),
])
def test_cache_strategies_match_original(tiny_242, name, strategy, num_steps, criterion):
    """huginn-tiny-242 (4 core layers).  The fixture prompt shares the batch with a longer prompt, which must not
    change its result (it exits at other iterations and pads the fixture prompt)."""
    model, params = tiny_242
    out = generate(model, params, [KV["prompt"][0].tolist(), OTHER_242], max_new_tokens=12, num_steps=num_steps,
                   init_scale=0.0, cache_strategy=strategy, exit_criterion=criterion,
                   exit_threshold=float(KV["adaptive_kl_threshold"]) if criterion else None, return_logits=True)
    np.testing.assert_array_equal(out.tokens[0], KV[name][0, 10:])
    assert_close(out.logits[0], KV[f"{name}_logits"][0], name=f"{name}_logits")
    if criterion:
        np.testing.assert_array_equal(out.steps[0], KV[f"{name}_steps"])
        assert len(set(np.asarray(out.steps).ravel())) > 2  # the rows really exit at different iterations


def test_cached_generation_equals_cache_free_forward(tiny, runs):
    """The original's cache-free logits over its greedy sequence, and ours over every generated sequence."""
    model, params = tiny
    out = runs("full")
    assert_close(out.logits[0], GEN["greedy_full_logits"][0, 9:21], name="vs original cache-free forward")
    # Our cache-free forward over the three (left-padded) sequences, padding kept out by segment ids.
    width = PROMPT_LEN + 11
    ids = np.zeros((3, width), np.int32)
    for i, prompt in enumerate(PROMPTS):
        ids[i, PROMPT_LEN - len(prompt):] = prompt + np.asarray(out.tokens[i, :11]).tolist()
    pad = PROMPT_LEN - np.asarray([len(p) for p in PROMPTS])
    idx = np.arange(width)[None]
    forward = jax.jit(lambda p, ids, segments, positions: model.apply(
        {"params": p}, ids, num_steps=4, init_scale=0.0, segment_ids=segments, positions=positions))(
        params, jnp.asarray(ids), jnp.asarray(idx >= pad[:, None], jnp.int32),
        jnp.asarray(np.maximum(idx - pad[:, None], 0), jnp.int32))
    assert_close(out.logits, forward.logits[:, PROMPT_LEN - 1:], name="vs cache-free forward")


# ---- batching -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SETTINGS))
def test_batched_prompts_of_different_lengths_equal_each_prompt_alone(runs, name):
    batch, alone = runs(name), runs(name, "alone")
    for i, single in enumerate(alone):
        np.testing.assert_array_equal(batch.tokens[i], single.tokens[0], err_msg=f"{name} row {i}")
        np.testing.assert_array_equal(batch.steps[i], single.steps[0], err_msg=f"{name} row {i}")
        assert_close(batch.logits[i], single.logits[0], rtol=2e-5, name=f"{name} row {i}")
    if "exit_criterion" in SETTINGS[name]:
        steps = np.asarray(batch.steps)
        assert steps.min() < steps.max() and len({tuple(r) for r in steps}) == 3  # rows exit on their own


@pytest.mark.parametrize("name", ["full", "latest-entropy"])
def test_right_padding_equals_left_padding(runs, name):
    left, right = runs(name), runs(name, "right")
    np.testing.assert_array_equal(left.tokens, right.tokens)
    np.testing.assert_array_equal(left.steps, right.steps)
    assert_close(left.logits, right.logits, rtol=2e-5, name=name)


def test_generation_on_a_mesh_equals_one_device(tiny, runs):
    """Under a (data, fsdp, tensor) = (2, 2, 2) mesh with the logical rules, the cache and activations are sharded
    (the batch of 3 unevenly); the result is the same."""
    model, params = tiny
    with jax.set_mesh(make_mesh((2, 2, 2))), nn.logical_axis_rules(DEFAULT_RULES):
        out = generate(model, params, PROMPTS, init_scale=0.0, return_logits=True, **SETTINGS["latest-entropy"])
    single = runs("latest-entropy")
    np.testing.assert_array_equal(out.tokens, single.tokens)
    np.testing.assert_array_equal(out.steps, single.steps)
    assert_close(out.logits, single.logits, rtol=2e-5, name="mesh vs one device")


# ---- speculative decoding, sampling, stopping -------------------------------------------------------------
def test_speculative_greedy_equals_plain_greedy(tiny, runs):
    model, params = tiny
    plain = runs("full")
    out = speculative_generate(model, params, PROMPTS, max_new_tokens=12, num_steps=4, draft_steps=1, lookahead=3,
                               init_scale=0.0)
    np.testing.assert_array_equal(out.tokens, plain.tokens)
    assert list(out.num_tokens) == [12, 12, 12]
    rounds = np.asarray(out.rounds)
    assert np.all(rounds >= 11 / 3) and np.all(rounds <= 11)  # 1 to 3 tokens per round after the prompt's
    # With stop tokens, each sequence ends where plain generation ends it.
    stop = int(plain.tokens[0, 5])
    stopped = speculative_generate(model, params, PROMPTS, max_new_tokens=12, num_steps=4, draft_steps=1,
                                   lookahead=3, init_scale=0.0, stop_tokens=[stop])
    np.testing.assert_array_equal(stopped.tokens, generate(model, params, PROMPTS, stop_tokens=[stop], init_scale=0.0,
                                                           return_logits=True, **SETTINGS["full"]).tokens)


def test_finished_sequences_stop_growing(tiny, runs):
    model, params = tiny
    full = np.asarray(runs("full").tokens)
    stops = [int(full[0, 3]), int(full[1, 6])]
    out = generate(model, params, PROMPTS, stop_tokens=stops, init_scale=0.0, return_logits=True, **SETTINGS["full"])
    for row, tokens in enumerate(full):
        hits = np.flatnonzero(np.isin(tokens, stops))
        end = hits[0] + 1 if len(hits) else len(tokens)
        assert int(out.num_tokens[row]) == end
        np.testing.assert_array_equal(out.tokens[row, :end], tokens[:end])  # the others are unaffected
        assert np.all(np.asarray(out.tokens[row, end:]) == -1) and np.all(np.asarray(out.steps[row, end:]) == 0)
    assert int(out.num_tokens[0]) <= 4


def test_sampling_is_reproducible_with_a_seed_and_respects_the_filters(tiny):
    model, params = tiny
    kw = dict(max_new_tokens=8, num_steps=4, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, return_logits=True)
    a = generate(model, params, PROMPTS, seed=3, **kw)  # random initial state (init_scale 1) and sampling
    np.testing.assert_array_equal(a.tokens, generate(model, params, PROMPTS, seed=3, **kw).tokens)
    assert not np.array_equal(a.tokens, generate(model, params, PROMPTS, seed=4, **kw).tokens)
    logits, tokens = np.asarray(a.logits, np.float64) / 0.7, np.asarray(a.tokens)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    chosen = np.take_along_axis(probs, tokens[..., None], -1)[..., 0]
    rank = (probs > chosen[..., None]).sum(-1)
    assert rank.max() < 20  # top-k
    assert np.all(chosen >= 0.05 * probs.max(-1) - 1e-6)  # min-p
    above = np.where(probs > chosen[..., None], probs, 0).sum(-1)  # mass of the more likely tokens
    assert np.all((rank == 0) | (above + chosen <= 0.9 + 1e-5))  # top-p (the original keeps cumulative <= p)


def test_sampler_filters_greedy_and_top_k_one_agree():
    logits = jax.random.normal(jax.random.key(0), (4, 50))
    greedy = Sampler()(logits, None)
    np.testing.assert_array_equal(Sampler(temperature=1.0, top_k=1)(logits, jax.random.key(1)), greedy)
    np.testing.assert_array_equal(Sampler(temperature=1.0, top_p=1e-6)(logits, jax.random.key(1)), greedy)
    np.testing.assert_array_equal(Sampler(temperature=1.0, min_p=1.0)(logits, jax.random.key(1)), greedy)


# ---- cache and criteria, unit level ---------------------------------------------------------------------
def test_cache_strategy_names_and_memory(tiny):
    model, _ = tiny
    assert CacheStrategy.parse("full") == CacheStrategy()
    assert CacheStrategy.parse("compress-4") == CacheStrategy.parse("compress-s4") == CacheStrategy(4)
    assert CacheStrategy.parse("latest") == CacheStrategy.parse("latest-m4") == CacheStrategy(None, True)
    assert CacheStrategy.parse("latest-m4-compress-s8") == CacheStrategy.parse("latest-compress-8") == \
        CacheStrategy(8, True)
    for bad in ("", "compress", "compress-0", "compress-r4", "skip", "latest-", "fullest"):
        with pytest.raises(ValueError, match="cache strategy"):
            CacheStrategy.parse(bad)
    cfg = model.config
    size = lambda s, r: KVCache.nbytes_for(cfg, 2, 30, CacheStrategy.parse(s), r)  # noqa: E731
    assert size("full", 16) == 2 * size("full", 8) - size("full", 0)  # grows with the iterations
    assert size("compress-2", 8) == size("compress-2", 64)  # does not
    cache = KVCache.create(cfg, 2, 30, CacheStrategy.parse("compress-2"), 8)
    assert cache.core.k.shape == (2, 2, 4, 16, 30) and cache.core.v.shape == (2, 2, 4, 30, 16)
    assert sum(x.nbytes for x in jax.tree.leaves(cache) if x.dtype == jnp.float32) == size("compress-2", 8)


def test_cache_stores_only_active_rows_and_latest_reads_the_deepest_entry(tiny):
    """Two rows; row 1 is inactive at iteration 1, so a later position reads its iteration-0 entry there."""
    model, _ = tiny
    cfg = model.config
    cache = KVCache.create(cfg, 2, 4, CacheStrategy.parse("latest"), 3)
    chunk = Chunk(start=jnp.zeros(2, jnp.int32), real=jnp.ones((2, 1), bool))
    kv = lambda value: jnp.full((2, 1, cfg.num_heads, cfg.resolved_head_dim), value, jnp.float32)  # noqa: E731
    for iteration, active in [(0, [True, True]), (1, [True, False])]:
        cursor = cache.core_cursor(chunk, jnp.asarray(active), iteration)
        for layer in range(cfg.num_core_layers):
            _, _, _, cursor = cursor.attend(kv(10 * iteration + layer), kv(10 * iteration + layer))
            cursor = cursor.advance()
        cache = cache.replace(core=cursor.group)
    valid = np.asarray(cache.core.valid[:, :, 0])  # [slots, batch] at position 0
    np.testing.assert_array_equal(valid[:, 0], [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(valid[:, 1], [1, 1, 0, 0, 0, 0])
    # A later position at iteration 1, layer 1: row 0 reads its iteration-1 entry, row 1 its iteration-0 entry.
    later = Chunk(start=jnp.ones(2, jnp.int32), real=jnp.ones((2, 1), bool))
    cursor = cache.core_cursor(later, jnp.asarray([True, True]), 1).advance()
    keys, values, mask, _ = cursor.attend(kv(99), kv(99))
    assert float(keys[0, 0, 0, 0]) == 11 and float(keys[1, 0, 0, 0]) == 1 and float(values[1, 0, 0, 0]) == 1
    np.testing.assert_array_equal(np.asarray(mask[:, 0, 0, :2]), [[True, True], [True, True]])
    # Without `latest`, row 1's position is left out instead.
    plain = cache.replace(strategy=CacheStrategy())
    cursor = plain.core_cursor(later, jnp.asarray([True, True]), 1).advance()
    _, _, mask, _ = cursor.attend(kv(99), kv(99))
    np.testing.assert_array_equal(np.asarray(mask[:, 0, 0, :2]), [[True, True], [False, True]])


def _reference_values(name, states, logits, vocab):
    """The original evaluators' successive values (raw, before thresholding), in numpy."""
    values, prev_state = [], states[0]
    prev_entropy, prev_logp, prev_arg, stable = 100.0, np.full(vocab, -np.log(vocab)), -1, 0
    for state, logit in zip(states[1:], logits):
        p = np.exp(logit - logit.max())
        p /= p.sum()
        if name == "entropy-diff":
            entropy = -(p * np.log(p + 1e-10)).sum()
            values.append(abs(entropy - prev_entropy))
            prev_entropy = entropy
        elif name in ("kl", "minp-kl"):
            if name == "minp-kl":
                p = np.where(p < 0.1 * p.max(), 1 / vocab, p)
                p /= p.sum()
            logp = np.log(p)
            values.append((np.exp(prev_logp) * (prev_logp - logp)).sum())
            prev_logp = logp
        elif name == "argmax-stability":
            arg = int(np.argmax(logit))
            stable = stable + 1 if arg == prev_arg else 0
            values.append(stable)
            prev_arg = arg
        elif name == "latent-diff":
            values.append((np.linalg.norm(state - prev_state, axis=-1) / np.linalg.norm(state, axis=-1)).mean())
            prev_state = state
        else:  # cosine
            cos = (state * prev_state).sum(-1) / np.linalg.norm(state, axis=-1) / np.linalg.norm(prev_state, axis=-1)
            values.append(1 - cos.mean())
            prev_state = state
    return np.asarray(values)


@pytest.mark.parametrize("name", sorted(DEFAULT_THRESHOLDS))
def test_exit_criteria_follow_the_original_definitions(name):
    rng = np.random.default_rng(1)
    vocab, steps = 40, 8
    base = rng.normal(size=(3, 16))  # states converge towards it, so the values shrink
    states = [base + rng.normal(size=(3, 16)) * 0.5 ** i for i in range(steps + 1)]
    logits = [rng.normal(size=vocab) * 0.3 ** i + np.arange(vocab) * 0.05 for i in range(steps)]
    expected = _reference_values(name, states, logits, vocab)
    threshold = float(np.median(expected))
    criterion = ExitCriterion.make(name, threshold)
    carry = criterion.init(jnp.asarray(states[0][None], jnp.float32), vocab)
    weights = jnp.ones((1, 3))
    for i in range(steps):
        exit_now, carry = criterion.check(carry, jnp.asarray(states[i + 1][None], jnp.float32), weights,
                                          jnp.asarray(logits[i][None], jnp.float32))
        want = expected[i] >= threshold if name == "argmax-stability" else expected[i] < threshold
        assert bool(exit_now[0]) == bool(want), (name, i, expected[i], threshold)
    assert ExitCriterion.make(name).threshold == DEFAULT_THRESHOLDS[name]


# ---- input checking -------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(tiny):
    model, params = tiny
    gen = lambda prompts, **kw: generate(model, params, prompts, **{"max_new_tokens": 4, **kw})  # noqa: E731
    with pytest.raises(ValueError, match="empty"):
        gen([[1, 2], []])
    with pytest.raises(ValueError, match="prompts is empty"):
        gen([])
    with pytest.raises(ValueError, match=r"exceeds the model's context \(max_seq_len=128\)"):
        gen([[1] * 100], max_new_tokens=29)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 512\)"):
        gen([[1, 512]])
    with pytest.raises(ValueError, match="token ids"):
        gen(np.asarray([[3, -1]]), lengths=[2])
    with pytest.raises(ValueError, match="unknown exit criterion 'kld'"):
        gen([[1, 2]], exit_criterion="kld")
    with pytest.raises(ValueError, match="unknown cache strategy 'compress'"):
        gen([[1, 2]], cache_strategy="compress")
    with pytest.raises(ValueError, match="padding_side"):
        gen([[1, 2]], padding_side="middle")
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen([[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError, match="lengths"):
        gen(np.ones((2, 3), np.int32), lengths=[3, 4])
    with pytest.raises(ValueError, match="stop tokens"):
        gen([[1, 2]], stop_tokens=[600])
    with pytest.raises(ValueError, match="top_p"):
        gen([[1, 2]], temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="lookahead"):
        speculative_generate(model, params, [[1, 2]], max_new_tokens=4, lookahead=0)
