"""bfloat16 compute with float32 weights, as the original trained (torch.autocast): matmuls in bfloat16, while the
residual stream, the norms and the recurrent state stay float32 (fixtures/README.md, mixed_precision.npz)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_depth.model.lm import RecurrentDepthLM

from helpers import TINY

STEPS = (2, 5, 13, 32)


def relative_error(actual, expected):
    """Frobenius norm of the difference over the reference's (the fixture's measure)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


@pytest.fixture(scope="module")
def bf16_forward(tiny):
    model, _ = tiny
    bf16 = RecurrentDepthLM(model.config.replace(dtype="bfloat16"))
    return jax.jit(lambda params, ids, states, r: bf16.apply({"params": params}, ids, num_steps=r,
                                                             input_states=states))


def test_bf16_compute_is_as_faithful_as_the_originals_autocast(tiny, tiny_forward, bf16_forward):
    ref = np.load(TINY / "mixed_precision.npz")
    _, params = tiny
    for r in STEPS:
        fp32 = ref[f"logits_fp32_r{r}"]
        # The float32 reference of this fixture is itself reproduced (same model, same inputs).
        ours_fp32 = tiny_forward(params, ref["input_ids"], ref["input_states"], r).logits
        assert relative_error(ours_fp32, fp32) < 1e-5, f"r={r}: float32 logits differ from the fixture"
        ours = relative_error(bf16_forward(params, ref["input_ids"], ref["input_states"], r).logits, fp32)
        original = relative_error(ref[f"logits_autocast_r{r}"], fp32)
        assert 0 < ours <= original, f"r={r}: bf16-compute error {ours:.3%} > the original's {original:.3%}"


def _dot_operand_dtypes(jaxpr) -> list[tuple[str, str]]:
    """Operand dtypes of every dot_general in a jaxpr, including those inside scans, loops and remat."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found += _dot_operand_dtypes(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found += _dot_operand_dtypes(sub)
    return found


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_matmuls_in_bf16_and_stream_in_the_parameter_dtype(tiny, param_dtype):
    model, params = tiny
    config = model.config.replace(dtype="bfloat16", param_dtype=param_dtype)
    params = jax.tree.map(lambda p: p.astype(param_dtype), params)
    ids, states = jnp.zeros((1, 6), jnp.int32), jnp.zeros((1, 6, config.hidden_size), param_dtype)

    def forward(params):  # no-gradient and gradient iterations both
        out = RecurrentDepthLM(config).apply({"params": params}, ids, num_steps=(2, 2), input_states=states,
                                             return_trajectory=True)
        return out.logits, out.latents, out.trajectory

    dots = _dot_operand_dtypes(jax.make_jaxpr(forward)(params).jaxpr)
    assert dots and all(d == ("bfloat16", "bfloat16") for d in dots), sorted(set(dots))
    logits, latents, trajectory = jax.eval_shape(forward, params)
    assert logits.dtype == jnp.float32
    # The normed state after every iteration and after the last: float32 with float32 weights (the original's
    # stream), bfloat16 with bfloat16 weights (as the original's bf16 checkpoint runs).
    assert latents.dtype == trajectory.dtype == jnp.dtype(param_dtype)
