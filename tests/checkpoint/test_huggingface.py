"""Checkpoint import/export in the original's Hugging Face format, conversion CLI, parameter checkpoints."""

import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from recurrent_depth import ModelConfig, RecurrentDepthLM, init_params
from recurrent_depth.checkpoint import huggingface as hf
from recurrent_depth.checkpoint import safetensors_reader
from recurrent_depth.checkpoint.huggingface import from_huggingface, to_huggingface
from recurrent_depth.checkpoint.loading import load_model
from recurrent_depth.checkpoint.params import load_params, param_shardings, save_params
from recurrent_depth.cli.convert import main as convert_main
from recurrent_depth.errors import CheckpointError
from recurrent_depth.runtime.sharding import make_mesh

from helpers import TINY, assert_close

CHECKPOINT = TINY / "checkpoint"


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _copy_checkpoint(tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(CHECKPOINT, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def test_export_writes_the_original_tensors_exactly(tiny, tmp_path):
    model, params = tiny
    to_huggingface(model, params, tmp_path / "out")
    original = load_file(str(CHECKPOINT / "model.safetensors"))
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(exported) == set(original)
    for name, tensor in original.items():
        if name == "freqs_cis":
            np.testing.assert_allclose(exported[name], tensor, atol=2e-6)
        else:
            np.testing.assert_array_equal(exported[name], tensor, err_msg=name)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    reference = json.loads((CHECKPOINT / "config.json").read_text())
    for key in ("n_embd", "n_heads", "n_layers", "n_layers_in_prelude", "n_layers_in_recurrent_block",
                "n_layers_in_coda", "intermediate_size", "vocab_size", "block_size", "rope_base", "norm_eps",
                "qk_bias", "tie_embeddings", "mean_recurrence", "mean_backprop_depth", "head_dim", "injection_type",
                "block_class_name", "effective_expected_depth"):
        assert written[key] == reference[key], key
    for key, value in reference["init_values"].items():
        assert written["init_values"][key] == pytest.approx(value, rel=1e-12)


def test_round_trip_is_exact_including_sharded_files(tiny, tmp_path):
    model, params = tiny
    to_huggingface(model, params, tmp_path / "sharded", max_shard_bytes=200_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    model2, params2 = from_huggingface(tmp_path / "sharded")
    assert model2.config == model.config
    _assert_trees_equal(params, params2)
    # Re-exporting unsharded over the same directory removes the stale shards.
    to_huggingface(model, params, tmp_path / "sharded")
    assert not list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))
    _assert_trees_equal(params, from_huggingface(tmp_path / "sharded")[1])


def test_untied_head_round_trip(tmp_path):
    config = ModelConfig(vocab_size=96, hidden_size=32, num_heads=2, intermediate_size=48, num_prelude_layers=1,
                         num_core_layers=1, num_coda_layers=1, max_seq_len=32, tie_embeddings=False, qk_bias=False)
    model = RecurrentDepthLM(config)
    params = nn.meta.unbox(init_params(model, jax.random.key(0)))
    to_huggingface(model, params, tmp_path)
    assert "lm_head.weight" in load_file(str(tmp_path / "model.safetensors"))
    model2, params2 = from_huggingface(tmp_path)
    assert model2.config.tie_embeddings is False and model2.config.qk_bias is False
    _assert_trees_equal(params, params2)


def test_load_to_bfloat16(tiny):
    ref = np.load(TINY / "forward.npz")
    model, params = from_huggingface(CHECKPOINT, dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    assert model.config.dtype == "bfloat16"
    out = model.apply({"params": params}, ref["input_ids"], num_steps=3, input_states=ref["input_states"])
    assert out.logits.dtype == jnp.float32
    # bf16 keeps ~3 significant digits; this only checks the bf16 path computes the same function.
    assert_close(out.logits, ref["logits_r3"], rtol=0.1, name="bf16 logits")


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("transformer.coda.0.mlp.fc.weight"), "missing tensor.*transformer.coda.0.mlp.fc.weight"),
    (lambda t: t.update({"transformer.extra.weight": np.zeros(3, np.float32)}), "unexpected tensor.*transformer.extra"),
    (lambda t: t.update({"transformer.ln_f.weight": np.zeros(65, np.float32)}),
     r"transformer.ln_f.weight has shape \(65,\), expected \(64,\)"),
])
def test_import_errors_name_the_tensor(tmp_path, edit, message):
    dst = _copy_checkpoint(tmp_path)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        from_huggingface(dst)


@pytest.mark.parametrize("key, value", [("injection_type", "add"), ("block_class_name", "PreNormBlock"),
                                        ("num_key_value_heads", 2), ("n_layers", 7)])
def test_unsupported_config_is_rejected(tmp_path, key, value):
    dst = _copy_checkpoint(tmp_path)
    config = json.loads((dst / "config.json").read_text())
    config[key] = value
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=key):
        from_huggingface(dst)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_huggingface(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_huggingface(tmp_path)
    dst = _copy_checkpoint(tmp_path)
    (dst / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_huggingface(dst)
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors"}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002"):
        from_huggingface(dst)


def test_parameter_checkpoint_round_trip_and_mismatch(tiny, tmp_path):
    model, params = tiny
    save_params(tmp_path / "p", model.config, params)
    model2, params2 = load_params(tmp_path / "p")
    assert model2.config == model.config
    _assert_trees_equal(params, params2)
    assert load_model(tmp_path / "p")[0].config == model.config
    config = json.loads((tmp_path / "p" / "model_config.json").read_text())
    config["intermediate_size"] = 128
    (tmp_path / "p" / "model_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not match"):
        load_params(tmp_path / "p")
    with pytest.raises(FileNotFoundError, match="neither"):
        load_model(tmp_path)


def test_convert_cli_both_directions(tmp_path, capsys):
    assert convert_main(["to-params", str(CHECKPOINT), str(tmp_path / "orbax")]) == 0
    assert convert_main(["to-hf", str(tmp_path / "orbax"), str(tmp_path / "hf")]) == 0
    original = load_file(str(CHECKPOINT / "model.safetensors"))
    converted = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for name in original:
        if name != "freqs_cis":
            np.testing.assert_array_equal(converted[name], original[name], err_msg=name)
    assert convert_main(["to-params", str(tmp_path / "missing"), str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and err.startswith("python -m recurrent_depth.cli.convert: error: ")
    assert err.count("\n") == 1 and not (tmp_path / "x").exists()
    src, dst = str(tmp_path / "orbax"), str(tmp_path / "x")
    for usage, message in [([], "missing command (commands: to-params, to-hf)"),
                           (["to-safetensors", src, dst], "unknown command 'to-safetensors'"),
                           (["to-hf", src], "to-hf takes SRC OUT_DIR, got"),
                           (["to-hf", src, dst, "--max_shard_gb=0"], "--max_shard_gb must be positive"),
                           (["to-hf", src, dst, "--max-shard-gb=1"], "Unknown command line flag 'max-shard-gb'"),
                           (["to-params", src, dst, "--max_shard_gb=1"], "--max_shard_gb is for to-hf"),
                           (["to-params", src, dst, "--dtype=int8"], "flag --dtype=int8")]:
        assert convert_main(usage) == 2, usage
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (usage, err)
    assert not (tmp_path / "x").exists()


def _bytes_per_device(params) -> dict:
    totals = {}
    for leaf in jax.tree.leaves(params):
        for shard in leaf.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return totals


def _count_reads(monkeypatch) -> dict:
    """Records every (start, length) read from each safetensors file, by file name."""
    reads, read_range = {}, safetensors_reader.SafetensorsFile.read_range

    def counted(self, start, length):
        reads.setdefault(self.path.name, []).append((start, length))
        return read_range(self, start, length)

    monkeypatch.setattr(safetensors_reader.SafetensorsFile, "read_range", counted)
    return reads


def _assert_read_once(reads: dict, directory, most_per_read=None):
    """No byte read twice, the bytes read at most 1.1x the tensors stored, and no read above `most_per_read`."""
    stored = 0
    for file in directory.glob("*.safetensors"):
        tensors = safetensors_reader.SafetensorsFile(epath.Path(file)).tensors
        stored += sum(d.itemsize * int(np.prod(shape)) for name, (d, shape, _) in tensors.items()
                      if name not in hf.IGNORED_TENSORS)
        ranges = sorted(reads.get(file.name, []))
        assert all(s + n <= t for (s, n), (t, _) in zip(ranges, ranges[1:])), f"{file.name}: overlapping reads"
    lengths = [n for ranges in reads.values() for _, n in ranges]
    assert sum(lengths) <= 1.1 * stored, (sum(lengths) / stored, "x the file")
    assert most_per_read is None or max(lengths) <= most_per_read


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (1, 2, 4)])
def test_sharded_import_reads_each_byte_once(tiny, tmp_path, monkeypatch, mesh_shape):
    """from_huggingface with shardings: every device holds ~1/8 of the bytes, the values equal the unsharded load
    and the host reads each stored byte once (reading each device's column slice on its own read the file 6.3x
    on (1, 8, 1), 2.5x on (1, 2, 4)); the ranged-read path (gs://) gives the same arrays as the memory map, in
    reads of at most the chunk size, here with a sharded export, converted to bfloat16 and back from it."""
    model, params = tiny
    shardings = param_shardings(make_mesh(mesh_shape))
    reads = _count_reads(monkeypatch)
    _, sharded = from_huggingface(CHECKPOINT, shardings=shardings)
    _assert_read_once(reads, CHECKPOINT)
    flat_shardings = traverse_util.flatten_dict(shardings(model.config))
    for path, leaf in traverse_util.flatten_dict(sharded).items():
        assert leaf.sharding == flat_shardings[path], path
    _assert_trees_equal(jax.device_get(sharded), jax.device_get(params))
    per_device = _bytes_per_device(sharded)
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    assert len(per_device) == 8
    # Norm scales and q/k biases (~1% of the bytes here) are replicated; everything else is split 8 ways.
    assert max(per_device.values()) < 1.1 * total / 8, (max(per_device.values()), total)
    to_huggingface(model, params, tmp_path / "f32", max_shard_bytes=200_000)
    monkeypatch.setattr(safetensors_reader, "is_url", lambda path: True)  # read as from cloud storage: seek + read
    monkeypatch.setattr(safetensors_reader, "CHUNK_BYTES", 1000)  # many blocks per tensor (rows are <= 512 bytes)
    reads.clear()
    _, remote = from_huggingface(tmp_path / "f32", dtype="bfloat16", shardings=shardings)
    _assert_read_once(reads, tmp_path / "f32", most_per_read=1000)
    as_bf16 = jax.tree.map(lambda x: np.asarray(x, jnp.bfloat16), params)
    _assert_trees_equal(jax.device_get(remote), as_bf16)
    to_huggingface(model, as_bf16, tmp_path / "bf16")  # stored bfloat16, loaded as float32
    _, widened = from_huggingface(tmp_path / "bf16", shardings=shardings)
    _assert_trees_equal(jax.device_get(widened), jax.tree.map(lambda x: np.asarray(x, np.float32), as_bf16))


def test_sharded_load_of_parameter_checkpoints_and_workdirs(tiny, tmp_path):
    """load_model with shardings restores parameter checkpoints and train.py workdirs straight into the shards."""
    from recurrent_depth.checkpoint.train_state import CHECKPOINTS_DIR, RUN_CONFIG_FILE, TrainCheckpointer
    from recurrent_depth.training.step import Trainer

    from helpers import local_iterator, small_config

    model, params = tiny
    shardings = param_shardings(make_mesh((1, 8, 1)))
    save_params(tmp_path / "p", model.config, params)
    _, restored = load_model(tmp_path / "p", shardings=shardings)
    _assert_trees_equal(jax.device_get(restored), jax.device_get(params))
    assert max(_bytes_per_device(restored).values()) < 1.1 * sum(x.nbytes for x in jax.tree.leaves(params)) / 8

    config = small_config()
    trainer = Trainer(config, make_mesh((1, 1, 1), jax.devices()[:1]))
    state = trainer.init_state()
    workdir = tmp_path / "run"
    checkpointer = TrainCheckpointer(workdir / CHECKPOINTS_DIR, every=1, keep=2, async_save=False)
    checkpointer.save(3, state, local_iterator(config), force=True)
    checkpointer.close()
    (workdir / RUN_CONFIG_FILE).write_text(config.to_json_best_effort())
    loaded_model, loaded = load_model(workdir, shardings=shardings)
    assert loaded_model.config == trainer.model_config
    flat_shardings = traverse_util.flatten_dict(shardings(trainer.model_config))
    for path, leaf in traverse_util.flatten_dict(loaded).items():
        assert leaf.sharding == flat_shardings[path], path
    _assert_trees_equal(jax.device_get(loaded), jax.device_get(state.params))
    _, unsharded = load_model(workdir)  # one device
    assert {d for x in jax.tree.leaves(unsharded) for d in x.devices()} == {jax.devices()[0]}


def test_truncated_safetensors_file_is_a_clear_error(tmp_path):
    dst = _copy_checkpoint(tmp_path)
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[:len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor .* has data offsets .* \(truncated\?\)"):
        from_huggingface(dst)
