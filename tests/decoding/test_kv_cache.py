"""The KV cache's fast path: `latest` over a ring of one iteration (latest-compress-K with K = core layers, the
serving default for huginn-0125's 4 core layers) has no earlier entry to fall back to, so it reads the ring's
entry directly, with no gather; it must give exactly what the ring alone gives."""

import numpy as np

from recurrent_depth import generate


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
