"""recurrent_depth.cli.aot: the tiny config's train step (splash attention) and generation compiled ahead of time
for a TPU v5p slice (with the `tpu` extra), and its command line's errors (anywhere)."""

import pytest

from recurrent_depth.cli import aot

from helpers import CONFIGS, small_config


def test_aot_compile_train_step_for_tpu_v5p_with_splash():
    pytest.importorskip("libtpu", reason="needs the `tpu` extra")
    config = small_config()
    config.model.update(attention_impl="splash", dtype="bfloat16")
    config.train.update(seq_len=128)
    report = aot.compile_train_step(config, "v5p:2x2x1", (1, 2, 2))
    assert report["device_kind"] == "TPU v5" and report["devices"] == 4
    assert report["fits"] and report["total_gib"] > 0 and report["compiled_tflops_per_device"] > 0


def test_aot_compile_generation_for_tpu_v5p():
    pytest.importorskip("libtpu", reason="needs the `tpu` extra")
    config = small_config()
    config.model.update(dtype="bfloat16")
    full = aot.compile_generate(config, "v5p:2x2x1", (1, 2, 2), batch_size=4, prompt_len=16, max_new_tokens=8,
                                num_steps=8, cache_strategy="full")
    ring = aot.compile_generate(config, "v5p:2x2x1", (1, 2, 2), batch_size=4, prompt_len=16, max_new_tokens=8,
                                num_steps=8, cache_strategy="compress-2")
    assert full["step"] == "generate" and full["device_kind"] == "TPU v5" and full["fits"]
    assert 0 < ring["total_bytes"] < full["total_bytes"]  # a 2-entry ring instead of 8 iterations' entries


def test_aot_command_line_errors_come_before_any_compilation(capsys):
    tiny = f"--config={CONFIGS / 'tiny.py'}"
    assert aot.main([tiny, "--config.train.stepz=1"]) == 2
    assert aot.main([tiny, "--mesh=1,two,1"]) == 2
    assert aot.main([tiny, "--step=infer"]) == 2
    assert aot.main([tiny, "--topology=v5p:2x2x1", "extra"]) == 2
    assert aot.main(["--config=no/such/config.py"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 5 and all(line.startswith(f"{aot.PROG}: error: ") for line in err)
    assert "no such config field: 'stepz'" in err[0] and "--mesh must be comma-separated integers" in err[1]
    assert "flag --step=infer" in err[2] and "takes no positional arguments" in err[3]
    assert "No such file or directory: 'no/such/config.py'" in err[4]


def test_aot_generation_with_fsdp_gathers_each_weight_where_it_is_used_on_tpu():
    """bfloat16 weights sharded FSDP over 4 chips: the decoding loop gathers each weight where it is used
    (`model.layers.use_late`) rather than holding gathered weights for the whole call (at huginn-0125's size the
    whole model on every chip: 6.15 GiB of temporaries for 1.69 GiB of weights per chip, 1.24 GiB now)."""
    pytest.importorskip("libtpu", reason="needs the `tpu` extra")
    config = small_config()
    config.model.update(vocab_size=32768, hidden_size=1024, num_heads=8, intermediate_size=3584, dtype="bfloat16",
                        param_dtype="bfloat16")
    report = aot.compile_generate(config, "v5e:2x2", (1, 4, 1), batch_size=4, prompt_len=8, max_new_tokens=4,
                                  num_steps=4, cache_strategy="compress-2")
    gathered = 4 * report["argument_gib"] * 2**30  # the whole model (the arguments are a quarter of it)
    # Regression pin from this configuration: 55 MB of temporaries with the hoisted gathers, 25 MB without.
    assert report["temp_bytes"] < gathered / 6, (report["temp_bytes"], gathered)
