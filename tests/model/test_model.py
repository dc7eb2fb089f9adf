"""Model behaviour beyond parity: state init, masking, input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def test_random_state_init_has_the_paper_statistics(tiny):
    """s_0 ~ trunc_normal(sqrt(2/5h), +-3 std) * sqrt(h): per-element std sqrt(2/5) (times the truncation factor)."""
    model, params = tiny
    e = jnp.zeros((4, 128, model.config.hidden_size))
    s0 = model.apply({"params": params}, e, 1.0, method=model.initial_state, rngs={"state": jax.random.key(0)})
    assert float(jnp.std(s0)) == pytest.approx(np.sqrt(2 / 5) * 0.98658, rel=0.02)
    limit = 3 * model.config.init_std * model.config.embed_scale
    assert float(jnp.max(jnp.abs(s0))) <= limit + 1e-6
    half = model.apply({"params": params}, e, 0.5, method=model.initial_state, rngs={"state": jax.random.key(0)})
    np.testing.assert_allclose(half, 0.5 * s0, rtol=1e-6)


def test_init_scale_zero_is_deterministic_and_random_init_follows_the_seed(tiny):
    model, params = tiny
    ids = jnp.arange(12, dtype=jnp.int32)[None]
    run = lambda **kw: model.apply({"params": params}, ids, num_steps=2, **kw).logits  # noqa: E731
    np.testing.assert_array_equal(run(init_scale=0.0), run(init_scale=0.0))
    a, b = run(rngs={"state": jax.random.key(1)}), run(rngs={"state": jax.random.key(1)})
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, run(rngs={"state": jax.random.key(2)}))


def test_document_masking_isolates_segments(tiny):
    """With segment ids, the second document's outputs equal those of the document on its own."""
    model, params = tiny
    rng = np.random.default_rng(0)
    doc_a, doc_b = rng.integers(0, 512, 7), rng.integers(0, 512, 9)
    packed = jnp.asarray(np.concatenate([doc_a, doc_b])[None], jnp.int32)
    segments = jnp.asarray([[1] * 7 + [2] * 9], jnp.int32)
    positions = jnp.asarray([list(range(7)) + list(range(9))], jnp.int32)
    out = model.apply({"params": params}, packed, num_steps=3, init_scale=0.0, segment_ids=segments,
                      positions=positions)
    alone = model.apply({"params": params}, jnp.asarray(doc_b[None], jnp.int32), num_steps=3, init_scale=0.0)
    np.testing.assert_allclose(out.logits[:, 7:], alone.logits, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_clear_errors(tiny):
    model, params = tiny
    apply = lambda ids, **kw: model.apply({"params": params}, ids, num_steps=1, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="exceeds the model's context"):
        apply(jnp.zeros((1, 129), jnp.int32), init_scale=0.0)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 512\)"):
        apply(jnp.asarray([[1, 512]]), init_scale=0.0)
    with pytest.raises(ValueError, match="token ids"):
        apply(jnp.asarray([[-1, 3]]), init_scale=0.0)
    with pytest.raises(ValueError, match="rngs=\\{'state'"):
        apply(jnp.asarray([[1, 2]]))
    with pytest.raises(ValueError, match="input_states must have shape"):
        apply(jnp.asarray([[1, 2]]), input_states=jnp.zeros((1, 3, 64)))
    with pytest.raises(ValueError, match="non-negative"):
        model.apply({"params": params}, jnp.asarray([[1, 2]]), num_steps=(-1, 1), init_scale=0.0)
    with pytest.raises(ValueError, match="integer scalars"):
        model.apply({"params": params}, jnp.asarray([[1, 2]]), num_steps=(1, jnp.asarray([2, 3])), init_scale=0.0)


@pytest.mark.parametrize("seq_len,blocks", [(48, 1), (256, 4), (320, 5)])
def test_blocked_causal_attention_equals_the_full_square(seq_len, blocks):
    """Query blocks that skip the masked key blocks give the full masked attention, forward and gradients, also
    with document masking."""
    from recurrent_depth.model.attention import _masked_attention, causal_blocks, causal_mask, xla_attention

    assert causal_blocks(seq_len) == blocks
    q, k, v, ct = jax.random.normal(jax.random.key(seq_len), (4, 2, seq_len, 4, 16))
    segments = jnp.cumsum(jax.random.bernoulli(jax.random.key(1), 0.02, (2, seq_len)), axis=1)
    mask = causal_mask(seq_len, segments)

    def forward_and_gradients(fn):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
        return out, *vjp(ct)

    blocked, full = forward_and_gradients(xla_attention), forward_and_gradients(_masked_attention)
    np.testing.assert_allclose(blocked[0], full[0], rtol=1e-5, atol=1e-6)
    for got, want in zip(blocked[1:], full[1:]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
