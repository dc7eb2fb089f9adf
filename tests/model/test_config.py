"""The model config: validation messages, unknown fields, the released shape, the tiny config, the init statistics."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_depth import ConfigError, ModelConfig, RecurrentDepthLM, init_params

from helpers import load_config as _load


@pytest.mark.parametrize("changes, field", [
    ({"hidden_size": 65}, "hidden_size"),
    ({"num_heads": 0}, "num_heads"),
    ({"vocab_size": -1}, "vocab_size"),
    ({"intermediate_size": 1.5}, "intermediate_size"),
    ({"num_coda_layers": -1}, "num_coda_layers"),
    ({"head_dim": 16}, "head_dim"),
    ({"hidden_size": 12, "num_heads": 4}, "head_dim"),  # odd head dim: no rotary pairs
    ({"dtype": "float8"}, "dtype"),
    ({"param_dtype": "int8"}, "param_dtype"),
    ({"norm_eps": 0.0}, "norm_eps"),
    ({"init_scale": -1.0}, "init_scale"),
    ({"qk_bias": "yes"}, "qk_bias"),
])
def test_invalid_values_name_the_field(changes, field):
    base = dict(vocab_size=64, hidden_size=32, num_heads=4, intermediate_size=32, max_seq_len=16)
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**{**base, **changes})


def test_unknown_field_is_rejected():
    with pytest.raises(ConfigError, match="hiden_size"):
        ModelConfig.from_dict({"hiden_size": 64})


def test_released_shape_config_has_the_published_parameter_count():
    config = ModelConfig.from_dict(_load("huginn_3p5b").model)
    shape = (config.hidden_size, config.num_heads, config.resolved_head_dim, config.intermediate_size)
    assert shape == (5280, 55, 96, 17920)
    assert (config.num_prelude_layers, config.num_core_layers, config.num_coda_layers) == (2, 4, 2)
    lengths = (config.vocab_size, config.max_seq_len, config.mean_recurrence, config.mean_backprop_depth)
    assert lengths == (65536, 4096, 32, 8)
    shapes = jax.eval_shape(lambda: init_params(RecurrentDepthLM(config), jax.random.key(0)))
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes)))
    assert count == 3_564_976_800  # reference §1.1: the exact unique-parameter count of huginn-0125


def test_tiny_config_builds_and_runs():
    config = ModelConfig.from_dict(_load("tiny").model)
    model = RecurrentDepthLM(config)
    params = nn.meta.unbox(init_params(model, jax.random.key(0)))
    out = model.apply({"params": params}, jnp.ones((1, 8), jnp.int32), num_steps=2, rngs={"state": jax.random.key(1)})
    assert out.logits.shape == (1, 8, config.vocab_size) and bool(jnp.isfinite(out.logits).all())


def test_takase_init_statistics():
    """Weights: trunc-normal std sqrt(2/5h); output projections std sqrt(1/(5 h l)); norms 1; qk bias 0."""
    config = ModelConfig(vocab_size=256, hidden_size=256, num_heads=4, intermediate_size=512, num_prelude_layers=1,
                         num_core_layers=1, num_coda_layers=1, max_seq_len=16, mean_recurrence=4)
    params = nn.meta.unbox(init_params(RecurrentDepthLM(config), jax.random.key(0)))
    trunc = 0.98658  # std of a unit normal truncated at +-3
    layer = params["core"]["layers_0"]
    assert np.std(layer["attn"]["qkv"]) == pytest.approx(config.init_std * trunc, rel=0.02)
    assert np.std(layer["attn"]["out"]) == pytest.approx(config.out_proj_std * trunc, rel=0.02)
    assert np.std(layer["mlp"]["proj"]) == pytest.approx(config.out_proj_std * trunc, rel=0.02)
    assert np.max(np.abs(params["embedding"])) <= 3 * config.init_std
    assert np.all(layer["norm_1"]["scale"] == 1) and np.all(layer["attn"]["qk_bias"] == 0)
