"""Run-config validation: every section's bad values named by field, and every shipped config validated before
anything compiles."""

import functools

import pytest

from recurrent_depth import ConfigError
from recurrent_depth.training.loop import train
from recurrent_depth.training.validation import validate_run_config

from helpers import load_config as _load


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
    config.data.update(kind="mixture", sources=({"kind": "csv", "paths": "x"},))
    with pytest.raises(ConfigError, match=r"data.sources\[0\].kind must be one of"):
        validate_run_config(config, num_devices=8)
    config = _load("tiny")
    config.train.microbatches = 3
    with pytest.raises(ConfigError, match=r"train.microbatches \(3\) must divide train.batch_size \(8\)"):
        validate_run_config(config, num_devices=8)
    config.train.microbatches = 1
    config.data.update(kind="mixture", sources=({"kind": "parquet", "paths": "x", "text_field": "t"},))
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['text_field'\] for a parquet source"):
        validate_run_config(config, num_devices=8)
    config = _load("tiny")
    config.train.log_every = 0  # used to raise ZeroDivisionError after the first compiled step
    with pytest.raises(ConfigError, match="train.log_every must be a positive integer, got 0"):
        train(config, tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written
