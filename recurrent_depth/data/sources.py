"""Reading documents: text and JSONL files (whole, or one byte range of their concatenation, as `prepare` shards
them), local or `gs://` (every path is an `etils.epath.Path`); a malformed line names its file and line."""

from __future__ import annotations

import functools
import glob
import json
import os
from collections.abc import Callable, Iterator, Sequence

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from recurrent_depth.data.tokenizer import Tokenizer

LARGE_TEXT_SOURCE = 1 << 28  # tokens of a text source beyond which a warning suggests a row store


def expand_paths(pattern: str | Sequence[str]) -> list[epath.Path]:
    """Files matching one glob pattern or a list of them (local or gs://); a pattern matching nothing is an
    error."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    files = []
    for p in map(str, patterns):
        if glob.has_magic(p):
            cut = p.rfind("/", 0, min(p.find(c) for c in "*?[" if c in p)) + 1
            matched = sorted(epath.Path(p[:cut] or ".").glob(p[cut:]))
        else:
            matched = [epath.Path(p)] if epath.Path(p).exists() else []
        if not matched:
            raise FileNotFoundError(f"no data file matches {p!r}")
        files += matched
    return files


def _json_object(line: bytes | str, where: Callable[[], str], error: type[ValueError] = ValueError) -> dict:
    """One JSONL line as a dict; `where()` names the file and line in the error."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise error(f"{where()}: malformed JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise error(f"{where()}: expected a JSON object, got {type(record).__name__}")
    return record


def jsonl_records(path: str | os.PathLike, error: type[ValueError] = ValueError) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; a malformed line raises `error` naming the
    file and line."""
    with epath.Path(path).open("r", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, _json_object(line, functools.partial("{}:{}".format, path, number), error)


def _line_number(path: epath.Path, offset: int) -> int:
    """The line holding byte `offset` (only for error messages: reads the file up to there)."""
    count = 1
    with path.open("rb") as f:
        while offset > 0:
            chunk = f.read(min(offset, 1 << 20))
            if not chunk:
                break
            count, offset = count + chunk.count(b"\n"), offset - len(chunk)
    return count


def _first_line_at(f, lo: int) -> int:
    """Seeks `f` to the first line that starts at byte `lo` or later; returns its offset."""
    if lo > 0:
        f.seek(lo - 1)
        f.readline()
    return f.tell()


def _utf8(data: bytes, path: epath.Path, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}:{_line_number(path, offset + err.start)}: not UTF-8 text") from None


def jsonl_lines(path: epath.Path, lo: int, hi: int) -> Iterator[tuple[int, Callable[[], str], bytes]]:
    """(offset, where, line) of each non-blank line that starts in bytes [lo, hi); `where()` names the file and
    line (it reads the file up to there: call it for errors only)."""
    with path.open("rb") as f:
        pos = _first_line_at(f, lo)
        while pos < hi:
            line = f.readline()
            if not line:
                break
            if line.strip():
                yield pos, functools.partial(lambda at: f"{path}:{_line_number(path, at)}", pos), line
            pos += len(line)


def _jsonl_range(path: epath.Path, lo: int, hi: int, text_field: str) -> Iterator[str]:
    """The `text_field` of each JSONL line that starts in bytes [lo, hi)."""
    for _, where, line in jsonl_lines(path, lo, hi):
        record = _json_object(line, where)
        if text_field not in record:
            raise ValueError(f"{where()}: no field {text_field!r}")
        yield str(record[text_field])


def _text_range(path: epath.Path, lo: int, hi: int) -> Iterator[str]:
    """The documents (runs of non-blank lines) of a text file whose blank line before them starts in bytes [lo, hi)
    (a document at the file's start: whose range holds byte 0).  Reads its range plus the end of its last document."""
    with path.open("rb") as f:
        pos = _first_line_at(f, lo)
        owner = 0 if pos == 0 else None  # the offset of the blank line just read (None: a non-blank line or unknown)
        lines, start, in_doc = None, 0, False  # lines: the document being collected, if it is this range's
        while pos < hi or lines is not None or (owner is not None and owner < hi):
            line = f.readline()
            if not line:
                break
            if line.strip():
                if not in_doc and owner is not None and lo <= owner < hi:
                    lines, start = [], pos
                if lines is not None:
                    lines.append(line)
                in_doc, owner = True, None
            else:
                if lines is not None:
                    yield _utf8(b"".join(lines), path, start).removesuffix("\n").removesuffix("\r")
                lines, in_doc, owner = None, False, pos
            pos += len(line)
        if lines is not None:
            yield _utf8(b"".join(lines), path, start).removesuffix("\n").removesuffix("\r")


def read_shard(kind: str, files: Sequence[epath.Path], shard: int, num_shards: int,
               text_field: str = "text") -> list[str]:
    """The documents of text or JSONL `files` that begin in byte range `shard` of `num_shards` of their
    concatenation; reads only that range (and the end of its last document).  The shards partition the corpus."""
    if kind not in ("text", "jsonl"):
        raise ValueError(f"read_shard reads text or jsonl files, not {kind!r}")
    docs = []
    for file, a, b in byte_ranges(files, shard, num_shards):
        docs += _text_range(file, a, b) if kind == "text" else _jsonl_range(file, a, b, text_field)
    return docs


def byte_ranges(files: Sequence[epath.Path], shard: int, num_shards: int) -> Iterator[tuple[epath.Path, int, int]]:
    """(file, lo, hi): the parts of byte range `shard` of `num_shards` of the files' concatenation, per file."""
    files = [epath.Path(f) for f in files]
    sizes = [f.stat().length for f in files]
    total = sum(sizes)
    lo, hi = shard * total // num_shards, (shard + 1) * total // num_shards
    start = 0
    for file, size in zip(files, sizes):
        a, b = max(lo - start, 0), min(hi - start, size)
        if a < b:
            yield file, a, b
        start += size


def read_documents(kind: str, files: Sequence[epath.Path], text_field: str = "text") -> list[str]:
    """Every document of text or JSONL files; malformed JSONL names the file and line."""
    return read_shard(kind, files, 0, 1, text_field)


class Tokenize:
    """text -> [BOS, ..., EOS] int32 (module-level class: picklable for grain workers)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> np.ndarray:
        t = self.tokenizer
        return np.asarray([t.bos_id, *t.encode(text), t.eos_id], np.int32)


def source_documents(source: ml_collections.ConfigDict, tokenizer: Tokenizer | None) -> list[np.ndarray]:
    """Every document of a text or JSONL source, tokenized: each process reads the whole source once, stating each
    file once (for small corpora; `prepare` a row store for a large one)."""
    if tokenizer is None:
        raise ValueError(f"a {source.kind} source needs data.tokenizer.kind and data.tokenizer.path")
    texts = read_documents(source.kind, expand_paths(source.paths), source.get("text_field", "text"))
    docs = list(map(Tokenize(tokenizer), texts))
    if not docs:
        raise ValueError(f"the data source {source.paths!r} holds no documents")
    tokens = sum(map(len, docs))
    if tokens > LARGE_TEXT_SOURCE:
        logging.warning("the %s source %r holds %d tokens, tokenized and held by every process: prepare a row store "
                        "instead (python -m recurrent_depth.cli.data prepare)", source.kind, source.paths, tokens)
    return docs
