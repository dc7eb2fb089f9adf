"""Offline training corpora: the Python standard library's source, on every machine that runs this project.

  python -m recurrent_depth.cli.corpus stdlib --output=corpus/stdlib [--vocab_size=4096]

writes `train.jsonl` and `valid.jsonl` (one source file a line, `{"text", "path"}`: JSONL, because Python source
has blank lines, which would split a `text` document), a SentencePiece `tokenizer.model` trained on the training
files, and `manifest.json` (Python version, file and byte counts). `configs/text_small.py` trains on it.
The split is by a hash of each file's path relative to the library, so it is the same on every machine with the
same Python version (other versions have other files).
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
import zlib
from pathlib import Path

from recurrent_depth.data.tokenizer import train_sentencepiece
from recurrent_depth.runtime.paths import as_path

TRAIN_FILE, VALID_FILE, TOKENIZER_FILE, MANIFEST_FILE = "train.jsonl", "valid.jsonl", "tokenizer.model", "manifest.json"
# Test suites, installed packages and bytecode are not the library's own code.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
MAX_FILE_BYTES = 200_000  # a few generated data tables (pydoc_data/topics.py, ...) are left out
DEFAULT_VOCAB_SIZE = 4096


def stdlib_files(root: str | os.PathLike | None = None, max_file_bytes: int = MAX_FILE_BYTES) -> list[Path]:
    """The .py files under `root` (default: this interpreter's standard library), sorted, without test suites,
    installed packages and files over `max_file_bytes`."""
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    if not root.is_dir():
        raise FileNotFoundError(f"source directory {root} does not exist")
    files = [p for p in sorted(root.rglob("*.py"))
             if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1]) and p.is_file()
             and 0 < p.stat().st_size <= max_file_bytes]
    if not files:
        raise ValueError(f"no .py files under {root}")
    return files


def is_valid_split(relative_path: str, valid_percent: float) -> bool:
    """Whether a file belongs to the held-out split: by a CRC of its relative path, stable across machines."""
    return zlib.crc32(relative_path.encode()) % 10_000 < valid_percent * 100


def prepare_stdlib(output: str | os.PathLike, *, root: str | os.PathLike | None = None,
                   vocab_size: int = DEFAULT_VOCAB_SIZE, valid_percent: float = 2.0, max_files: int | None = None,
                   max_file_bytes: int = MAX_FILE_BYTES) -> dict:
    """Writes the corpus of `root`'s .py files (see the module docstring) and trains its tokenizer; returns the
    manifest. `max_files` takes every n-th file, for small test corpora."""
    if not 0 < valid_percent < 100:
        raise ValueError(f"valid_percent must lie in (0, 100), got {valid_percent}")
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    files = stdlib_files(root, max_file_bytes)
    if max_files is not None:
        if max_files < 2:
            raise ValueError(f"max_files must be at least 2 (a training and a held-out file), got {max_files}")
        files = files[::-(-len(files) // max_files)][:max_files]
    output = as_path(output)
    output.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[tuple[str, str]]] = {TRAIN_FILE: [], VALID_FILE: []}
    skipped, train_paths = [], []
    for file in files:
        relative = file.relative_to(root).as_posix()
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            skipped.append(relative)
            continue
        held_out = is_valid_split(relative, valid_percent)
        splits[VALID_FILE if held_out else TRAIN_FILE].append((relative, text))
        if not held_out:
            train_paths.append(file)
    if not splits[VALID_FILE]:  # a small subset may hash entirely to training: hold out its last file
        splits[VALID_FILE].append(splits[TRAIN_FILE].pop())
        train_paths.pop()
    if not splits[TRAIN_FILE]:
        raise ValueError(f"no training files among the {len(files)} selected under {root}")
    for name, docs in splits.items():
        with (output / name).open("w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": text, "path": path}) + "\n" for path, text in docs)
    tokenizer = train_sentencepiece(train_paths, output / TOKENIZER_FILE.removesuffix(".model"), vocab_size)
    manifest = {"source": str(root), "python": sys.version.split()[0], "vocab_size": tokenizer.vocab_size,
                "skipped_not_utf8": skipped,
                **{name.removesuffix(".jsonl"): {"files": len(docs), "bytes": sum(len(t.encode()) for _, t in docs)}
                   for name, docs in splits.items()}}
    (output / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest
