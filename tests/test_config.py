"""Config schema, validation messages (model and whole run configs) and the shipped configs."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_depth import ConfigError, ModelConfig, RecurrentDepthLM, init_params
from recurrent_depth.run_config import validate_run_config
from recurrent_depth.train_loop import train

from conftest import load_config as _load


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
    assert (config.hidden_size, config.num_heads, config.resolved_head_dim, config.intermediate_size) == (5280, 55, 96, 17920)
    assert (config.num_prelude_layers, config.num_core_layers, config.num_coda_layers) == (2, 4, 2)
    assert (config.vocab_size, config.max_seq_len, config.mean_recurrence, config.mean_backprop_depth) == (65536, 4096, 32, 8)
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


@pytest.mark.parametrize("field, value, message", [
    ("train.log_every", 0, "train.log_every must be a positive integer, got 0"),
    ("train.microbatches", 0, "train.microbatches must be a positive integer, got 0"),
    ("train.microbatches", 3, "train.microbatches (3) must divide train.batch_size (8)"),
    ("train.steps", -5, "train.steps must be a positive integer, got -5"),
    ("train.batch_size", 6, "the microbatch size (train.batch_size / train.microbatches = 6) must be divisible by "
                            "the data x fsdp mesh size (8)"),
    ("train.seq_len", 4096, "train.seq_len (4096) exceeds model.max_seq_len (128)"),
    ("checkpoint.every", 0, "checkpoint.every must be a positive integer, got 0"),
    ("checkpoint.keep_every", -1, "checkpoint.keep_every must be an integer >= 0, got -1"),
    ("train.optimizer.name", "sgd", "train.optimizer.name must be one of ('adamw', 'ellis_adam'), got 'sgd'"),
    ("train.optimizer.schedule", "linear", "train.optimizer.schedule must be one of ('constant', 'cosine', 'wsd'), "
                                           "got 'linear'"),
    ("train.optimizer.warmup_steps", 500, "train.optimizer (schedule 'constant', train.steps=200): warmup_steps (500) "
                                          "must be <= total_steps (200)"),
    ("train.optimizer.b2", 1.0, "train.optimizer.b2 must be a finite number >= 0.0 and < 1.0, got 1.0"),
    ("train.depth.kind", "uniform", "train.depth.kind must be one of ('poisson-lognormal', 'fixed'), got 'uniform'"),
    ("data.kind", "text", "data.kind must be one of ('synthetic', 'shell_game', 'mixture', 'chat'), got 'text'"),
    ("mesh.shape", (2, 2, 1), "mesh.shape: mesh {'data': 2, 'fsdp': 2, 'tensor': 1} needs 4 devices, but 8 are "
                              "available"),
    ("eval.num_steps", (1, 0), "eval.num_steps must be a non-empty list of positive integers, got (1, 0)"),
    ("eval.tasks", ("foo:bar",), "eval.tasks: 'foo:bar' is not KIND:TARGET[:KEY=VALUE...]"),
    ("eval.exit_criterion", "entropy", "eval.exit_criterion must be one of ('entropy-diff', "),
    ("eval.exit_threshold", 0.0, "eval.exit_threshold must be a finite number > 0.0, got 0.0"),
    ("model.hidden_size", 65, "model.hidden_size (65) must be divisible by model.num_heads (4)"),
])
def test_run_config_errors_name_the_field(field, value, message):
    config = _load("tiny")
    *parents, name = field.split(".")
    section = functools.reduce(lambda c, p: c[p], parents, config)
    section[name] = value
    with pytest.raises(ConfigError) as err:
        validate_run_config(config, num_devices=8)
    assert str(err.value).startswith(message)


def test_every_shipped_config_validates_and_training_checks_before_compiling(tmp_path):
    for name, devices in (("demo", 1), ("tiny", 8), ("huginn_3p5b", 256)):
        validate_run_config(_load(name), num_devices=devices)
    config = _load("tiny")
    config.data.update(kind="mixture", sources=({"kind": "parquet", "paths": "x"},))
    with pytest.raises(ConfigError, match=r"data.sources\[0\].kind must be one of"):
        validate_run_config(config, num_devices=8)
    config = _load("tiny")
    config.train.microbatches = 8
    with pytest.raises(ConfigError, match=r"must divide each process's batch \(train.batch_size / 2 processes = 4\)"):
        validate_run_config(config, num_devices=8, process_count=2)
    config = _load("tiny")
    config.train.log_every = 0  # used to raise ZeroDivisionError after the first compiled step
    with pytest.raises(ConfigError, match="train.log_every must be a positive integer, got 0"):
        train(config, tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written
