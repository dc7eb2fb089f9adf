"""Numerical parity with the original PyTorch implementation (fixtures/README.md explains every array)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import TINY, TINY_242, assert_close
from recurrent_depth.hf import freqs_cis, from_huggingface, params_to_hf
from recurrent_depth.losses import cross_entropy


def test_forward_logits_and_latents_match_original(tiny, tiny_forward):
    ref = np.load(TINY / "forward.npz")
    _, params = tiny
    for r in (1, 3, 8):
        out = tiny_forward(params, ref["input_ids"], ref["input_states"], r)
        assert_close(out.logits, ref[f"logits_r{r}"], name=f"logits r={r}")
        assert_close(out.latents, ref[f"latents_r{r}"], name=f"latents r={r}")
    # The iteration count is traced: one compilation serves every r.
    assert len(tiny_forward.traces) == 1


def test_cache_free_forward_of_generated_sequence_matches_original(tiny):
    """generate.npz: one forward pass over the greedy generation at 4 iterations from a zero state."""
    ref = np.load(TINY / "generate.npz")
    model, params = tiny
    out = model.apply({"params": params}, ref["greedy"], num_steps=int(ref["num_steps"]), init_scale=0.0)
    assert_close(out.logits, ref["greedy_full_logits"], name="greedy_full_logits")


def test_truncated_backprop_loss_and_gradients_match_original(tiny):
    ref = np.load(TINY / "train_grad.npz")
    model, params = tiny
    steps = (int(ref["num_steps_no_grad"]), int(ref["num_steps_with_grad"]))

    def loss_fn(p):
        out = model.apply({"params": p}, ref["input_ids"], num_steps=steps, input_states=ref["input_states"])
        return cross_entropy(out.logits, jnp.asarray(ref["labels"]))[0]

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    assert_close(loss, ref["loss"], name="loss")
    named = params_to_hf(model.config, grads)
    expected = {k[len("grad/"):] for k in ref.files if k.startswith("grad/")}
    assert set(named) == expected
    for name, grad in named.items():
        assert_close(grad, ref[f"grad/{name}"], name=f"grad {name}")


def test_training_forward_compiles_once_for_every_n(tiny):
    """(n, k): n no-gradient iterations (traced), k with gradient: changing n does not recompile."""
    model, params = tiny
    ids = jnp.arange(32, dtype=jnp.int32).reshape(2, 16)
    traces = []

    @jax.jit
    def grad_fn(p, n):
        traces.append(1)
        return jax.grad(lambda q: model.apply({"params": q}, ids, num_steps=(n, 2), init_scale=0.0).logits.mean())(p)

    grads = [grad_fn(params, n) for n in (0, 1, 5)]
    assert len(traces) == 1
    # The state entering the gradient iterations depends on n, so the gradients do too.
    assert not np.allclose(grads[0]["embedding"], grads[2]["embedding"])


def test_no_gradient_iterations_contribute_no_gradient(tiny):
    """With k = 0 nothing is differentiable through the core; the prelude only gets gradient via k > 0."""
    model, params = tiny
    ids = jnp.arange(16, dtype=jnp.int32)[None]
    loss = lambda p, k: model.apply({"params": p}, ids, num_steps=(3, k), init_scale=0.0).logits.mean()  # noqa
    g0 = jax.grad(loss)(params, 0)
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g0["core"]))
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g0["prelude_0"]))
    g1 = jax.grad(loss)(params, 1)
    assert float(jnp.abs(g1["core"]["adapter"]).max()) > 0 and float(jnp.abs(g1["prelude_0"]["attn"]["qkv"]).max()) > 0


def test_trajectory_is_the_normed_state_after_each_iteration(tiny, tiny_forward):
    ref = np.load(TINY / "forward.npz")
    model, params = tiny
    out = model.apply({"params": params}, ref["input_ids"], num_steps=(1, 2), input_states=ref["input_states"],
                      return_trajectory=True)
    assert out.trajectory.shape == (3, *ref["latents_r3"].shape)
    assert_close(out.trajectory[-1], out.latents, name="last trajectory entry")
    assert_close(out.trajectory[0], ref["latents_r1"], name="trajectory[0]")
    assert_close(out.trajectory[2], ref["latents_r3"], name="trajectory[2]")
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
    out = model.apply({"params": params}, tokens, num_steps=6, init_scale=0.0)
    # With the `full` cache strategy generation is exact, so the cache-free argmax reproduces every token.
    np.testing.assert_array_equal(np.argmax(out.logits[0, prompt_len - 1:-1], -1), tokens[0, prompt_len:])
    assert_close(out.logits[0, prompt_len - 1:-1], ref["greedy_full_logits"][0], name="greedy_full_logits")
