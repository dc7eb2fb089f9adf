"""TPU path on a CPU machine: splash attention (interpret mode) against xla attention, every remat policy against
no remat, and the tiny config's train step (splash attention) and generation compiled ahead of time for a TPU v5p
slice."""









import pytest

from helpers import small_config


def test_aot_compile_train_step_for_tpu_v5p_with_splash():
    pytest.importorskip("libtpu", reason="needs the `tpu` extra")
    from recurrent_depth.cli.aot import compile_train_step

    config = small_config()
    config.model.update(attention_impl="splash", dtype="bfloat16")
    config.train.update(seq_len=128)
    report = compile_train_step(config, "v5p:2x2x1", (1, 2, 2))
    assert report["device_kind"] == "TPU v5" and report["devices"] == 4
    assert report["fits"] and report["total_gib"] > 0 and report["compiled_tflops_per_device"] > 0


def test_aot_compile_generation_for_tpu_v5p():
    pytest.importorskip("libtpu", reason="needs the `tpu` extra")
    from recurrent_depth.cli.aot import compile_generate

    config = small_config()
    config.model.update(dtype="bfloat16")
    full = compile_generate(config, "v5p:2x2x1", (1, 2, 2), batch_size=4, prompt_len=16, max_new_tokens=8,
                            num_steps=8, cache_strategy="full")
    ring = compile_generate(config, "v5p:2x2x1", (1, 2, 2), batch_size=4, prompt_len=16, max_new_tokens=8,
                            num_steps=8, cache_strategy="compress-2")
    assert full["step"] == "generate" and full["device_kind"] == "TPU v5" and full["fits"]
    assert 0 < ring["total_bytes"] < full["total_bytes"]  # a 2-entry ring instead of 8 iterations' entries
