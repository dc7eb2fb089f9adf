"""The KV cache's fast paths: `latest` over a ring of one iteration (latest-compress-K with K = core layers, the
serving default for huginn-0125's 4 core layers) has no earlier entry to fall back to, so it reads the ring's
entry directly, with no gather; it must give exactly what the ring alone gives.  A chunk's span limits what
attention reads to the leading positions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_depth import generate
from recurrent_depth.decoding.kv_cache import CacheStrategy, Chunk, KVCache


def test_latest_over_a_ring_of_one_iteration_equals_the_ring_alone(tiny):
    model, params = tiny  # 2 core layers
    assert model.config.num_core_layers == 2
    prompts = [[5, 9, 200, 31, 7, 64], [3, 17, 450]]  # of different lengths: the shorter is padded
    run = lambda strategy: generate(model, params, prompts, max_new_tokens=6, num_steps=8,  # noqa: E731
                                    cache_strategy=strategy, exit_criterion="latent-diff", exit_threshold=0.1,
                                    return_logits=True, seed=3)
    fast, ring = run("latest-compress-2"), run("compress-2")
    np.testing.assert_array_equal(fast.tokens, ring.tokens)
    np.testing.assert_array_equal(fast.steps, ring.steps)
    assert len(set(np.asarray(fast.steps).ravel())) > 1  # tokens exit at different iterations: entries go missing
    np.testing.assert_array_equal(fast.logits, ring.logits)


@pytest.mark.parametrize("strategy", ["latest-compress-2", "latest", "compress-3"])
def test_a_span_reads_the_leading_positions_of_what_the_whole_buffer_gives(tiny, strategy):
    """Chunk.span (the serving engine's decode programs): attention reads buffer positions [0, span) only; keys,
    values and mask must be exactly the leading span positions of the full read, also where `latest` falls back to
    earlier entries of positions whose entry is missing."""
    model, _ = tiny
    cfg, batch, max_len, span = model.config, 3, 32, 16
    cache = KVCache.create(cfg, batch, max_len, CacheStrategy.parse(strategy), num_steps=3)
    rng = np.random.default_rng(0)
    fill = lambda group: group.replace(  # noqa: E731  (random entries, about half of them missing)
        k=jnp.asarray(rng.normal(size=group.k.shape), group.k.dtype),
        v=jnp.asarray(rng.normal(size=group.v.shape), group.v.dtype),
        valid=jnp.asarray(rng.random(group.valid.shape) < 0.5))
    cache = cache.replace(core=fill(cache.core), prelude=fill(cache.prelude))
    chunk = lambda span: Chunk(start=jnp.array([3, 9, 15]), real=jnp.ones((batch, 1), bool), span=span)  # noqa: E731
    heads, dim = cfg.num_heads, cfg.resolved_head_dim
    k, v = (jnp.asarray(rng.normal(size=(batch, 1, heads, dim)), jnp.float32) for _ in range(2))
    active = jnp.array([True, False, True])
    for cursor in (lambda c: cache.core_cursor(c, active, jnp.int32(2)), lambda c: cache.prelude_cursor(c, active)):
        whole, part = cursor(chunk(None)).attend(k, v), cursor(chunk(span)).attend(k, v)
        np.testing.assert_array_equal(part[0], whole[0][..., :span])  # keys [b, h, d, len]
        np.testing.assert_array_equal(part[1], whole[1][:, :, :span])  # values [b, h, len, d]
        np.testing.assert_array_equal(part[2], whole[2][..., :span])  # mask [b, 1, q, len]
        assert part[2].shape[-1] == span and bool(part[2].any())
        for a, b in zip(jax.tree.leaves(part[3].group), jax.tree.leaves(whole[3].group)):  # the same entries stored
            np.testing.assert_array_equal(a, b)
