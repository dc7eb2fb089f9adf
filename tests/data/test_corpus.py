"""The offline Python-source corpus (recurrent_depth.data.corpus) and configs/text_small.py built on it."""

import importlib.util
import json

import jax
import numpy as np
import pytest

from recurrent_depth.checkpoint.params import abstract_params
from recurrent_depth.cli.corpus import main
from recurrent_depth.data.corpus import TOKENIZER_FILE, TRAIN_FILE, VALID_FILE, is_valid_split, prepare_stdlib
from recurrent_depth.data.pipeline import make_dataset
from recurrent_depth.data.tokenizer import load_tokenizer
from recurrent_depth.training.validation import validate_run_config

from helpers import CONFIGS


def _source_tree(root):
    """A fake library: 40 modules, a test suite and a package's bytecode cache (both excluded)."""
    for i in range(40):
        package = root / f"pkg{i % 4}"
        package.mkdir(parents=True, exist_ok=True)
        (package / f"mod{i}.py").write_text(
            f'"""Module {i}: ünïcode."""\n\n\ndef f{i}(x, y={i}):\n    """Adds."""\n    return x + y * {i}\n\n\n'
            f"class C{i}:\n    def __init__(self):\n        self.value = [f{i}(k) for k in range({i})]\n")
    (root / "test").mkdir()
    (root / "test" / "test_x.py").write_text("assert True\n")
    (root / "pkg0" / "__pycache__").mkdir()
    (root / "pkg0" / "__pycache__" / "mod0.py").write_text("junk = 1\n")
    return root


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = _source_tree(tmp_path_factory.mktemp("lib"))
    out = tmp_path_factory.mktemp("corpus")
    manifest = prepare_stdlib(out, root=root, vocab_size=400, valid_percent=20.0)
    return root, out, manifest


def test_split_is_deterministic_disjoint_and_complete(corpus, tmp_path):
    root, out, manifest = corpus
    train, valid = _records(out / TRAIN_FILE), _records(out / VALID_FILE)
    train_paths, valid_paths = {r["path"] for r in train}, {r["path"] for r in valid}
    assert not train_paths & valid_paths and valid_paths and train_paths
    assert train_paths | valid_paths == {f"pkg{i % 4}/mod{i}.py" for i in range(40)}  # tests and caches left out
    assert all(is_valid_split(p, 20.0) for p in valid_paths) and not any(is_valid_split(p, 20.0) for p in train_paths)
    assert (manifest["train"]["files"], manifest["valid"]["files"]) == (len(train), len(valid))
    assert train[0]["text"] == (root / train[0]["path"]).read_text()  # whole files, blank lines kept
    again = tmp_path / "again"
    assert main(["stdlib", "--root", str(root), "--output", str(again), "--vocab_size", "400",
                 "--valid_percent=20"]) == 0
    for name in (TRAIN_FILE, VALID_FILE):
        assert (again / name).read_bytes() == (out / name).read_bytes()


def test_tokenizer_round_trips_python_source(corpus):
    root, out, _ = corpus
    tok = load_tokenizer("sentencepiece", out / TOKENIZER_FILE)
    for record in _records(out / VALID_FILE):
        assert tok.decode(tok.encode(record["text"])) == record["text"]
    text = "def g(a):\n\treturn {'k': a ** 2}  # ünseen ✓\n\n\n"
    assert tok.decode(tok.encode(text)) == text


def test_bad_input_is_a_message(tmp_path, capsys):
    assert main(["stdlib", "--root", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and err.startswith("python -m recurrent_depth.cli.corpus: error: ")
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()
    for usage in (["--output", str(tmp_path / "o")], ["python", "--output", str(tmp_path / "o")], ["stdlib"],
                  ["stdlib", "--output", str(tmp_path / "o"), "--vocab-size=400"]):
        assert main(usage) == 2
    err = capsys.readouterr().err
    assert "missing command (commands: stdlib)" in err and "unknown command 'python'" in err
    assert "--output must have a value" in err and "Unknown command line flag 'vocab-size'" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="valid_percent"):
        prepare_stdlib(tmp_path / "o", root=tmp_path, valid_percent=0)


def test_text_small_config_validates_and_builds(corpus):
    _, out, _ = corpus
    spec = importlib.util.spec_from_file_location("text_small", CONFIGS / "text_small.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(str(out))  # what --config=configs/text_small.py:DIR loads
    model_config = validate_run_config(config, num_devices=1)
    assert config.data.tokenizer.path == str(out / TOKENIZER_FILE)
    # The corpus's tokenizer (asked for 4096 pieces, here 400) fits the model's vocabulary.
    config.train.update(batch_size=2, seq_len=32)
    batch = next(iter(make_dataset(config.data, batch_size=2, seq_len=32, vocab_size=model_config.vocab_size,
                                   seed=0)))
    assert batch["inputs"].shape == (2, 32) and np.all(batch["inputs"] < 400)
    shapes = abstract_params(model_config)
    assert 1e6 < sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)) < 3e6  # small: ~15 CPU minutes
