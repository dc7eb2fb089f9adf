"""TPU kernels and remat on a CPU machine: splash attention (interpret mode) against xla attention, every remat
policy against no remat."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_depth import init_params
from recurrent_depth.model.attention import causal_mask, splash_attention, xla_attention
from recurrent_depth.model.config import REMAT_POLICIES
from recurrent_depth.training.losses import cross_entropy

from helpers import assert_close


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
    """On the tiny fixture's shape with one prelude and one core layer (freshly initialised): every layer kind,
    and five compilations of a smaller program."""
    config = dataclasses.replace(tiny[0].config, num_prelude_layers=1, num_core_layers=1)
    model = type(tiny[0])(config)
    params = nn.meta.unbox(init_params(model, jax.random.key(0)))
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
