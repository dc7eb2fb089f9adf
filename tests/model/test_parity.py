"""Numerical parity with the original PyTorch implementation (fixtures/README.md explains every array)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from safetensors.numpy import load_file

from recurrent_depth.checkpoint.huggingface import freqs_cis, from_huggingface, params_to_hf
from recurrent_depth.training.losses import cross_entropy

from helpers import TINY, TINY_242, XLA_DEFAULT, assert_close

# The tolerances the README states (max error relative to the reference's largest magnitude, float32).  Measured
# on CPU: logits and latents <= 6.4e-7, the loss 1.5e-7, the gradients <= 1.3e-6 (a norm scale's).
LOGITS_RTOL = 1e-6
GRAD_RTOL = 2e-6


def test_forward_logits_and_latents_match_original(tiny, tiny_forward):
    ref = np.load(TINY / "forward.npz")
    _, params = tiny
    for r in (1, 3, 8):
        out = tiny_forward(params, ref["input_ids"], ref["input_states"], r)
        assert_close(out.logits, ref[f"logits_r{r}"], rtol=LOGITS_RTOL, name=f"logits r={r}")
        assert_close(out.latents, ref[f"latents_r{r}"], rtol=LOGITS_RTOL, name=f"latents r={r}")
    # The iteration count is traced: one compilation serves every r.
    assert len(tiny_forward.traces) == 1


def test_cache_free_forward_of_generated_sequence_matches_original(tiny):
    """generate.npz: one forward pass over the greedy generation at 4 iterations from a zero state."""
    ref = np.load(TINY / "generate.npz")
    model, params = tiny
    out = model.apply({"params": params}, ref["greedy"], num_steps=int(ref["num_steps"]), init_scale=0.0)
    assert_close(out.logits, ref["greedy_full_logits"], rtol=LOGITS_RTOL, name="greedy_full_logits")


@pytest.fixture(scope="module")
def train_grad(tiny):
    """Jitted loss-and-gradient with traced (n, k), shared by the tests below, with a trace counter."""
    model, _ = tiny
    traces = []

    @jax.jit
    def fn(params, input_ids, labels, input_states, n, k):
        traces.append(1)

        def loss_fn(p):
            out = model.apply({"params": p}, input_ids, num_steps=(n, k), input_states=input_states)
            return cross_entropy(out.logits, labels)[0]

        return jax.value_and_grad(loss_fn)(params)

    fn.traces = traces
    return fn


def test_truncated_backprop_loss_and_gradients_match_original(tiny, train_grad):
    ref = np.load(TINY / "train_grad.npz")
    model, params = tiny
    loss, grads = train_grad(params, ref["input_ids"], ref["labels"], ref["input_states"],
                             ref["num_steps_no_grad"], ref["num_steps_with_grad"])
    assert_close(loss, ref["loss"], rtol=GRAD_RTOL, name="loss")
    named = params_to_hf(model.config, grads)
    expected = {k[len("grad/"):] for k in ref.files if k.startswith("grad/")}
    assert set(named) == expected
    for name, grad in named.items():
        assert_close(grad, ref[f"grad/{name}"], rtol=GRAD_RTOL, name=f"grad {name}")


def test_training_forward_compiles_once_for_every_n_and_k(tiny, train_grad):
    """Changing the sampled (n, k) does not recompile; a traced k equals the same static k."""
    model, params = tiny
    ref = np.load(TINY / "train_grad.npz")
    args = (ref["input_ids"], ref["labels"], ref["input_states"])
    before = len(train_grad.traces)
    results = {nk: train_grad(params, *args, *nk) for nk in [(0, 2), (4, 1), (5, 2)]}
    assert len(train_grad.traces) - before <= 1  # at most the first call traces (if no other test ran first)
    # The state entering the gradient iterations depends on n, so the gradients do too.
    assert not np.allclose(results[(0, 2)][1]["embedding"], results[(5, 2)][1]["embedding"])

    def static(p):
        out = model.apply({"params": p}, args[0], num_steps=(4, 1), input_states=args[2])
        return cross_entropy(out.logits, jnp.asarray(args[1]))[0]

    loss, grads = jax.jit(jax.value_and_grad(static))(params)
    assert_close(results[(4, 1)][0], loss, rtol=1e-6, name="loss traced k vs static k")
    for a, b in zip(jax.tree.leaves(results[(4, 1)][1]), jax.tree.leaves(grads)):
        assert_close(a, b, rtol=1e-5, name="grad traced k vs static k")


def test_no_gradient_iterations_contribute_no_gradient(tiny):
    """With k = 0 nothing is differentiable through the core; the prelude only gets gradient via k > 0."""
    model, params = tiny
    ids = jnp.arange(16, dtype=jnp.int32)[None]
    loss = lambda p, k: model.apply({"params": p}, ids, num_steps=(3, k), init_scale=0.0).logits.mean()  # noqa
    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g0 = grad(params, 0)
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g0["core"]))
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g0["prelude_0"]))
    g1 = grad(params, 1)
    assert float(jnp.abs(g1["core"]["adapter"]).max()) > 0 and float(jnp.abs(g1["prelude_0"]["attn"]["qkv"]).max()) > 0


def test_trajectory_is_the_normed_state_after_each_iteration(tiny, tiny_forward):
    ref = np.load(TINY / "forward.npz")
    model, params = tiny
    out = model.apply({"params": params}, ref["input_ids"], num_steps=(1, 2), input_states=ref["input_states"],
                      return_trajectory=True)
    assert out.trajectory.shape == (3, *ref["latents_r3"].shape)
    assert_close(out.trajectory[-1], out.latents, name="last trajectory entry")
    assert_close(out.trajectory[0], ref["latents_r1"], rtol=LOGITS_RTOL, name="trajectory[0]")
    assert_close(out.trajectory[2], ref["latents_r3"], rtol=LOGITS_RTOL, name="trajectory[2]")
    with pytest.raises(ValueError, match="static"):
        jax.jit(lambda n: model.apply({"params": params}, ref["input_ids"], num_steps=n, init_scale=0.0,
                                      return_trajectory=True))(3)


def test_rope_table_matches_stored_freqs_cis(tiny):
    model, _ = tiny
    stored = load_file(str(TINY / "checkpoint" / "model.safetensors"))["freqs_cis"]
    np.testing.assert_allclose(freqs_cis(model.config), stored, rtol=0, atol=2e-6)


def test_released_layer_layout_fixture_forward_runs():
    """huginn-tiny-242 (prelude 2, core 4, coda 2) imports; its cache-free greedy run reproduces the original's."""
    ref = np.load(TINY_242 / "generate_kv.npz")
    model, params = from_huggingface(TINY_242 / "checkpoint")
    assert model.config.num_core_layers == 4 and model.config.num_coda_layers == 2
    tokens = ref["greedy_full"]
    prompt_len = ref["prompt"].shape[1]
    forward = jax.jit(lambda p: model.apply({"params": p}, tokens, num_steps=6, init_scale=0.0),
                      compiler_options=XLA_DEFAULT)
    out = forward(params)
    # With the `full` cache strategy generation is exact, so the cache-free argmax reproduces every token.
    np.testing.assert_array_equal(np.argmax(out.logits[0, prompt_len - 1:-1], -1), tokens[0, prompt_len:])
    assert_close(out.logits[0, prompt_len - 1:-1], ref["greedy_full_logits"][0], rtol=LOGITS_RTOL,
                 name="greedy_full_logits")


def test_out_of_range_token_ids_under_jit_give_nan_not_numbers(tiny, tiny_forward):
    """Traced ids cannot raise: an id outside [0, vocab) makes its row's logits NaN from its position on (id = -1
    used to give the last embedding row, silently); checkify reports it; concrete ids raise."""
    ref = np.load(TINY / "forward.npz")
    model, params = tiny
    vocab = model.config.vocab_size
    clean = np.asarray(tiny_forward(params, ref["input_ids"], ref["input_states"], 2).logits)
    for bad in (vocab, -1):
        ids = np.array(ref["input_ids"])
        ids[0, 3] = bad
        logits = np.asarray(tiny_forward(params, ids, ref["input_states"], 2).logits)
        assert np.isnan(logits[0, 3:]).all(), bad
        np.testing.assert_array_equal(logits[1:], clean[1:])  # other rows are untouched
    forward = lambda i: model.apply({"params": params}, i, num_steps=1, init_scale=0.0).logits  # noqa: E731
    error, _ = checkify.checkify(jax.jit(forward), errors=checkify.user_checks)(jnp.asarray(ids))
    with pytest.raises(Exception, match=rf"token ids must lie in \[0, {vocab}\), got values in \[-1, "):
        error.throw()
    with pytest.raises(ValueError, match=rf"token ids must lie in \[0, {vocab}\), got values in \[-1, "):
        forward(ids)
