"""Parallel (diffusion-style) sampling: parity with the original's sampler (fixtures/README.md), batched rows equal
their own runs, reproducible sampling, one compilation per shape and setting, clear errors.

Every setting but the window width and the sampler is traced, so the runs below share a few compilations.
"""

import json

import numpy as np
import pytest

from recurrent_depth import parallel_generate
from recurrent_depth.checkpoint.huggingface import from_huggingface
from recurrent_depth.decoding.parallel import _parallel_jit

from helpers import TINY_242

DIFF = np.load(TINY_242 / "generate_diffusion.npz")
RUNS = json.loads((TINY_242 / "generate_diffusion.json").read_text())
PROMPT = DIFF["prompt"][0].tolist()  # 10 tokens
NEW = 16
# The original's argument names -> parallel_generate's.
NAMES = {"inner_recurrence": "inner_steps", "freeze_strategy": "freeze", "exit_t": "exit_threshold",
         "ema_embeds": "embed_ema", "state_noise_mixing": "noise_mixing"}
_rng = np.random.default_rng(0)
PROMPTS = [PROMPT, _rng.integers(0, 512, 6).tolist(), _rng.integers(0, 512, 13).tolist()]
WIDTH = 13  # the padded prompt width of the batched runs


def _settings(name):
    """parallel_generate's keywords for one of the fixture's settings (the fixture ran at num_steps 32)."""
    kw = {NAMES.get(k, k): v for k, v in RUNS[name].items()
          if k not in ("diffusion_steps", "num_core_forward_passes", "len")}
    return dict(dict(num_steps=32), **kw)


@pytest.fixture(scope="module")
def tiny_242():
    return from_huggingface(TINY_242 / "checkpoint")


@pytest.mark.parametrize("name", list(RUNS))
def test_matches_original(tiny_242, name):
    """First 16 new tokens, iterations per position and outer steps as the original's (greedy, zero states)."""
    model, params = tiny_242
    out = parallel_generate(model, params, [PROMPT], max_new_tokens=NEW, init_scale=0.0, **_settings(name))
    np.testing.assert_array_equal(out.tokens[0], DIFF[name][0, len(PROMPT):len(PROMPT) + NEW])
    # The original also counts the prefill's num_steps at the first new token's position.
    expected = DIFF[f"{name}_recurrence_per_position"][0, len(PROMPT):len(PROMPT) + NEW].copy()
    expected[0] -= _settings(name)["num_steps"]
    np.testing.assert_array_equal(out.iterations[0], expected)
    assert int(out.outer_steps[0]) == RUNS[name]["diffusion_steps"]
    assert int(out.num_tokens[0]) == NEW
    np.testing.assert_array_equal(out.steps[0, 1:], out.iterations[0, :-1])


def _alone(model, params, prompt, padding_side, kw):
    ids = np.zeros((1, WIDTH), np.int32)
    if padding_side == "left":
        ids[0, WIDTH - len(prompt):] = prompt
    else:
        ids[0, :len(prompt)] = prompt
    return parallel_generate(model, params, ids, lengths=[len(prompt)], padding_side=padding_side, **kw)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("freeze", ["latent-diff", "token-stability", "fixed"])
def test_batch_rows_equal_single_runs(tiny_242, padding_side, freeze):
    """Prompts of different lengths in one batch: each row has its own window, freezing and stop state."""
    model, params = tiny_242
    kw = dict(max_new_tokens=12, num_steps=8, inner_steps=2, init_scale=0.0, freeze=freeze, max_wavefront=8)
    batch = parallel_generate(model, params, PROMPTS, padding_side=padding_side, **kw)
    outer = []
    for row, prompt in enumerate(PROMPTS):
        alone = _alone(model, params, prompt, padding_side, kw)
        np.testing.assert_array_equal(batch.tokens[row], alone.tokens[0])
        np.testing.assert_array_equal(batch.iterations[row], alone.iterations[0])
        assert int(batch.outer_steps[row]) == int(alone.outer_steps[0])
        outer.append(int(alone.outer_steps[0]))
    if freeze == "latent-diff":
        assert len(set(outer)) > 1, "the rows should finish at different outer steps"


def test_stop_tokens_end_each_row(tiny_242):
    """A row ends at its first final stop token (after num_steps outer steps); the others go on."""
    model, params = tiny_242
    kw = dict(max_new_tokens=12, num_steps=8, inner_steps=2, init_scale=0.0, max_wavefront=8)
    free = parallel_generate(model, params, PROMPTS, **kw)
    stop = int(free.tokens[0, 3])
    out = parallel_generate(model, params, PROMPTS, stop_tokens=[stop], **kw)
    for row in range(len(PROMPTS)):
        tokens = np.asarray(free.tokens[row])
        hits = np.flatnonzero(tokens == stop)
        n = int(hits[0]) + 1 if hits.size else len(tokens)
        np.testing.assert_array_equal(out.tokens[row, :n], tokens[:n])
        assert (np.asarray(out.tokens[row, n:]) == -1).all() and int(out.num_tokens[row]) == n
    assert int(out.outer_steps[0]) < int(free.outer_steps[0])


def test_sampling_reproducible_from_seed(tiny_242):
    """Sampled tokens and random initial states (init scale 1) from the seed.  Fixed freezing: with random
    weights and random states the latent differences would never fall below the threshold."""
    model, params = tiny_242
    kw = dict(max_new_tokens=NEW, num_steps=8, inner_steps=2, temperature=1.0, top_k=50, max_wavefront=8,
              freeze="fixed")
    a = parallel_generate(model, params, PROMPTS, seed=1, **kw)
    b = parallel_generate(model, params, PROMPTS, seed=1, **kw)
    c = parallel_generate(model, params, PROMPTS, seed=2, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.iterations, b.iterations)
    assert not np.array_equal(a.tokens, c.tokens)
    assert ((np.asarray(a.tokens) >= 0) & (np.asarray(a.tokens) < model.config.vocab_size)).all()
    assert (np.asarray(a.outer_steps) < 100).all()


def test_one_compilation_per_shape_and_setting(tiny_242):
    """num_steps, inner_steps, headway, freeze, thresholds, ema, mixing, seed and stop tokens are traced."""
    model, params = tiny_242
    kw = dict(max_new_tokens=NEW, init_scale=0.0, max_wavefront=8)
    parallel_generate(model, params, [PROMPT], **kw)
    before = _parallel_jit._cache_size()
    out = parallel_generate(model, params, [PROMPT], num_steps=12, inner_steps=3, headway=2, freeze="fixed",
                            exit_threshold=0.1, embed_ema=0.3, noise_mixing=0.2, seed=5, stop_tokens=[3], **kw)
    assert _parallel_jit._cache_size() == before
    assert int(out.num_tokens[0]) >= 1


@pytest.mark.parametrize("kw, message", [
    (dict(freeze="latent"), "unknown freeze strategy 'latent'"),
    (dict(max_wavefront=0), "max_wavefront must be a positive integer"),
    (dict(inner_steps=0), "inner_steps must be a positive integer"),
    (dict(headway=9, max_wavefront=8), r"headway \(9\) exceeds max_wavefront \(8\)"),
    (dict(max_new_tokens=120), "exceeds the model's context"),
    (dict(exit_threshold=-1.0), "exit_threshold must be a non-negative number"),
    (dict(embed_ema=1.5), r"embed_ema must be a number in \[0, 1\]"),
    (dict(cache_strategy="nope"), "unknown cache strategy"),
])
def test_bad_settings_fail_before_compiling(tiny_242, kw, message):
    model, params = tiny_242
    before = _parallel_jit._cache_size()
    with pytest.raises(ValueError, match=message):
        parallel_generate(model, params, [PROMPT], **dict(dict(max_new_tokens=NEW), **kw))
    assert _parallel_jit._cache_size() == before
