"""bench/fullsize.py at the tiny shape: the checkpoint it writes is the released layout (byte for byte what the
safetensors library writes, the release's placement of tensors in four shards), the bench runs end to end for this
project's side with one JSON line of figures, a second run reuses the checkpoint, and a directory holding anything
else is refused.  (The original's side needs torch, which CI does not have.)"""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def fullsize():
    spec = importlib.util.spec_from_file_location("fullsize_bench", ROOT / "bench" / "fullsize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _line(capsys) -> dict:
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def test_huginn_layout_is_the_releases(fullsize):
    """At huginn-0125's shape: Hugging Face's 5 GB split of the state dict, the listed shard sizes, the index's size
    (6.19 kB on the hub) and 3,564,976,800 parameters plus the lm_head copy and the RoPE table."""
    layout = fullsize.tensor_layout("huginn-0125")
    shards, current, size = [], [], 0
    for name, shape in (t for shard in layout for t in shard):  # huggingface_hub's split, in state-dict order
        nbytes = 4 * math.prod(shape)
        if current and size + nbytes > 5e9:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    assert [[name for name, _ in shard] for shard in layout] == shards + [current]
    assert [round(sum(4 * math.prod(s) for _, s in shard) / 1e9, 2) for shard in layout] == [4.77, 4.74, 4.74, 1.38]
    values = {name: math.prod(shape) for shard in layout for name, shape in shard}
    assert sum(values.values()) - values["lm_head.weight"] - values["freqs_cis"] == 3_564_976_800
    assert fullsize.hf_config("huginn-0125")["torch_dtype"] == "bfloat16"


def test_bench_writes_then_reuses_and_refuses(fullsize, tmp_path, capsys):
    directory = tmp_path / "ckpt"
    common = [f"--dir={directory}", "--prompt_len=4", "--num_steps=2", "--new_tokens=3"]
    # The generate measurement alone: its compilation takes most of this test's time (the forward's is like it).
    assert fullsize.main([*common, "--shape=tiny", "--devices=1", "--measure=generate"]) == 0
    line = _line(capsys)
    assert line["implementation"] == "recurrent_depth" and line["written_s"] is not None
    assert line["shape"] == {"hidden": 64, "heads": 4, "mlp": 96, "vocab": 512, "layers": [2, 4, 2], "context": 128}
    (row,) = line["rows"]
    assert row["devices"] == 1 and set(row) == {"devices", "generate"}
    generated = row["generate"]
    assert generated["load_s"] > 0 and generated["peak_rss_gb"] > 0 and generated["peak_anon_gb"] > 0
    assert generated["per_device_gb"] == [generated["params_gb"]] and generated["params_gb"] > 0
    assert generated["tokens_per_s"] > 0 and generated["decode_tokens_per_s"] > 0 and generated["first_token_s"] > 0
    assert np.asarray(generated["tokens"]).shape == (1, 3)

    # The files: the released layout, each shard byte for byte what the safetensors library writes.
    names = sorted(p.name for p in directory.iterdir())
    assert names == ["config.json", "generation_config.json", *[f"model-0000{i}-of-00004.safetensors"
                                                                 for i in range(1, 5)], "model.safetensors.index.json"]
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shards = {}
    for name, file in index["weight_map"].items():
        shards.setdefault(file, []).append(name)
    assert sorted(shards["model-00004-of-00004.safetensors"]) == ["lm_head.weight"]
    assert {"freqs_cis", "transformer.wte.weight"} <= set(shards["model-00001-of-00004.safetensors"])
    for file in shards:
        tensors = load_file(directory / file)
        assert sorted(tensors) == sorted(shards[file]) and all(t.dtype == np.float32 for t in tensors.values())
        save_file(tensors, tmp_path / "again.safetensors", metadata={"format": "pt"})
        assert (tmp_path / "again.safetensors").read_bytes() == (directory / file).read_bytes(), file
    np.testing.assert_array_equal(load_file(directory / "model-00004-of-00004.safetensors")["lm_head.weight"],
                                  load_file(directory / "model-00001-of-00004.safetensors")["transformer.wte.weight"])

    # A second run reuses the checkpoint (whatever --shape says); here sharded over two devices.
    before = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    assert fullsize.main([*common, "--shape=mid", "--devices=2", "--measure=load"]) == 0
    line = _line(capsys)
    assert line["written_s"] is None and line["shape"]["hidden"] == 64
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == before
    (row,) = line["rows"]
    load = row["load"]
    assert len(load["per_device_gb"]) == 2 and all(0 < b < load["params_gb"] for b in load["per_device_gb"])

    # A directory holding something else is refused before anything is written; so is a missing original.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert fullsize.main([f"--dir={other}", "--shape=tiny"]) == 1
    assert "holds no checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    assert fullsize.main([f"--dir={directory}", f"--original={tmp_path}"]) == 1
    assert "raven_modeling_minimal.py" in capsys.readouterr().err
    assert fullsize.main([f"--dir={directory}", "--devices=0"]) == 2
