"""TPU path on a CPU machine: splash attention (interpret mode) against xla attention, every remat policy against
no remat, and the tiny config's train step (splash attention) and generation compiled ahead of time for a TPU v5p
slice."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_close, small_config
from recurrent_depth.attention import causal_mask, splash_attention, xla_attention
from recurrent_depth.config import REMAT_POLICIES
from recurrent_depth.losses import cross_entropy


@pytest.mark.parametrize("segmented", [False, True])
def test_splash_equals_xla_attention(segmented):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 128, 4, 16)), jnp.float32) for _ in range(3))
    segments = jnp.asarray(np.repeat([[1] * 50 + [2] * 60 + [3] * 18], 2, 0)) if segmented else None
    mask = causal_mask(128, segments)
    out = splash_attention(q, k, v, segments, interpret=True)
    assert_close(out, xla_attention(q, k, v, mask), rtol=1e-5, name="splash forward")
    grad = lambda f: jax.grad(lambda q: jnp.sum(f(q) * v))(q)  # noqa: E731
    assert_close(grad(lambda q: splash_attention(q, k, v, segments, interpret=True)),
                 grad(lambda q: xla_attention(q, k, v, mask)), rtol=1e-5, name="splash gradient")


def test_every_remat_policy_gives_the_same_loss_and_gradients(tiny):
    model, params = tiny
    ids = jnp.arange(48, dtype=jnp.int32).reshape(2, 24) % 512
    results = {}
    for policy in REMAT_POLICIES:
        m = type(model)(dataclasses.replace(model.config, remat_policy=policy))

        def loss(p, m=m):
            return cross_entropy(m.apply({"params": p}, ids, num_steps=(2, 2), init_scale=0.0).logits, ids)[0]

        results[policy] = jax.jit(jax.value_and_grad(loss))(params)
    reference = results["everything"]  # no rematerialisation
    for policy, (loss, grads) in results.items():
        assert_close(loss, reference[0], rtol=1e-6, name=f"{policy} loss")
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference[1])):
            assert_close(a, b, rtol=1e-5, name=f"{policy} gradients")


def test_aot_compile_train_step_for_tpu_v5p_with_splash():
    pytest.importorskip("libtpu", reason="needs the `tpu` extra")
    from recurrent_depth.aot import compile_train_step

    config = small_config()
    config.model.update(attention_impl="splash", dtype="bfloat16")
    config.train.update(seq_len=128)
    report = compile_train_step(config, "v5p:2x2x1", (1, 2, 2))
    assert report["device_kind"] == "TPU v5" and report["devices"] == 4
    assert report["fits"] and report["total_gib"] > 0 and report["compiled_tflops_per_device"] > 0


def test_aot_compile_generation_for_tpu_v5p():
    pytest.importorskip("libtpu", reason="needs the `tpu` extra")
    from recurrent_depth.aot import compile_generate

    config = small_config()
    config.model.update(dtype="bfloat16")
    full = compile_generate(config, "v5p:2x2x1", (1, 2, 2), batch_size=4, prompt_len=16, max_new_tokens=8,
                            num_steps=8, cache_strategy="full")
    ring = compile_generate(config, "v5p:2x2x1", (1, 2, 2), batch_size=4, prompt_len=16, max_new_tokens=8,
                            num_steps=8, cache_strategy="compress-2")
    assert full["step"] == "generate" and full["device_kind"] == "TPU v5" and full["fits"]
    assert 0 < ring["total_bytes"] < full["total_bytes"]  # a 2-entry ring instead of 8 iterations' entries
