"""Building a row store (recurrent_depth.data.row_format) from text and JSONL files, once, for corpus-scale runs.

Shard s of S holds the documents that begin in byte range s of S of the input files' concatenation (`read_shard`;
with text and JSONL files mixed, range s of each kind's files, the kinds in the order they first appear), each
tokenized [BOS, ..., EOS], concatenated and cut into rows of seq_len + 1 tokens that record where documents begin
(a document may continue into the next row); the shard's last row is padded.  A shard is written to a temporary
file, moved or copied into place, and then its sidecar `<shard>.json` (rows, documents, tokens): a shard is
finished iff its sidecar exists, so a rerun after a kill writes only the others.  `prepare.json` keeps the
parameters, and a rerun with other parameters into a directory holding finished shards is refused.  Process p of
P writes shards p, p + P, ...; the process that finds every shard finished writes `index.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import multiprocessing
import os
from collections.abc import Iterator, Sequence

import numpy as np
from absl import logging
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from tqdm import tqdm

from recurrent_depth.data.row_format import StoreIndex, encode_row, tokenizer_identity
from recurrent_depth.data.sources import Tokenize, expand_paths, read_shard
from recurrent_depth.data.tokenizer import Tokenizer
from recurrent_depth.runtime.paths import as_path, check_bucket, write_atomically, write_text_atomically

SHARD_BYTES = 128 << 20  # input text per shard when the number of shards is automatic
PARAMS_FILE = "prepare.json"
INPUT_KINDS = ("text", "jsonl")


def shard_name(shard: int, num_shards: int) -> str:
    return f"rows-{shard:05d}-of-{num_shards:05d}.arrayrecord"


def _file_kind(file: epath.Path, kind: str | None = None) -> str:
    """`kind` if given, else by suffix: .jsonl/.json files are JSONL, the rest text."""
    return kind or ("jsonl" if file.suffix in (".jsonl", ".json") else "text")


def pack_rows(docs: Sequence[np.ndarray], row_len: int, pad_id: int) -> Iterator[bytes]:
    """The records of the documents concatenated and cut into rows of `row_len` tokens, the last one padded."""
    if not docs:
        return
    tokens = np.concatenate(docs)  # [n]
    doc_starts = np.cumsum([0] + [len(d) for d in docs[:-1]])  # [documents]
    padded = np.full(math.ceil(len(tokens) / row_len) * row_len, pad_id, np.int32)
    padded[:len(tokens)] = tokens
    for lo in range(0, len(tokens), row_len):
        hi = lo + row_len
        starts = doc_starts[np.searchsorted(doc_starts, lo, "right"):np.searchsorted(doc_starts, hi)] - lo
        yield encode_row(padded[lo:hi], starts, min(row_len, len(tokens) - lo))


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """What every shard's writer needs (picklable: it travels to the worker processes)."""

    output: str
    groups: tuple[tuple[str, tuple[str, ...]], ...]  # (kind, files), the kinds in order of first appearance
    num_shards: int
    seq_len: int
    text_field: str
    tokenizer: Tokenizer


def write_shard(plan: ShardPlan, shard: int) -> dict:
    """Tokenizes, packs and writes shard `shard`, then its sidecar; returns the sidecar's counts."""
    tokenize = Tokenize(plan.tokenizer)
    docs = [tokenize(text) for kind, files in plan.groups
            for text in read_shard(kind, [epath.Path(f) for f in files], shard, plan.num_shards, plan.text_field)]
    name = shard_name(shard, plan.num_shards)
    output = epath.Path(plan.output)
    counts = {"rows": 0, "documents": len(docs), "tokens": int(sum(len(d) for d in docs))}

    def write(path: str) -> None:
        writer = ArrayRecordWriter(path, "group_size:1")  # a record per chunk: random access by row
        try:
            for record in pack_rows(docs, plan.seq_len + 1, plan.tokenizer.pad_id):
                writer.write(record)
                counts["rows"] += 1
        finally:
            writer.close()

    write_atomically(output / name, write)
    write_text_atomically(output / f"{name}.json", json.dumps(counts, indent=1))
    return counts


def prepare(inputs: Sequence[str], tokenizer: Tokenizer, output: str | os.PathLike, *, seq_len: int,
            num_shards: int | None = None, kind: str | None = None, text_field: str = "text",
            process_index: int = 0, process_count: int = 1, workers: int | None = None) -> StoreIndex | None:
    """Writes this process's unfinished shards of the row store of `inputs` (files or globs, local or gs://) in
    `output`, over `workers` processes (default: one per CPU); returns the store's index, or None while shards of
    other processes are missing.  `num_shards` defaults to one per 128 MiB of input."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count {process_count})")
    if kind is not None and kind not in INPUT_KINDS:
        raise ValueError(f"unknown input kind {kind!r}; valid kinds: {INPUT_KINDS}")
    files = expand_paths(list(inputs))
    sizes = [f.stat().length for f in files]
    if not any(sizes):
        raise ValueError(f"no documents in {list(inputs)}: the files are empty")
    num_shards = num_shards or max(1, math.ceil(sum(sizes) / SHARD_BYTES))
    groups: dict[str, list[str]] = {}
    for f in files:
        groups.setdefault(_file_kind(f, kind), []).append(str(f))
    plan = ShardPlan(str(as_path(output)), tuple((k, tuple(v)) for k, v in groups.items()), num_shards, seq_len,
                     text_field, tokenizer)
    params = {"seq_len": seq_len, "tokenizer": tokenizer_identity(tokenizer), "num_shards": num_shards,
              "inputs": [[str(f), size, _file_kind(f, kind)] for f, size in zip(files, sizes)],
              "text_field": text_field}
    out = _start_store(plan.output, params)

    done = _finished_shards(out, num_shards)
    todo = [s for s in range(process_index, num_shards, process_count) if s not in done]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
    with tqdm(total=len(todo), desc="prepare", unit="shard") as progress:
        if workers == 1:
            for shard in todo:
                write_shard(plan, shard)
                progress.update()
        else:  # spawn: the parent may have started jax's threads, which a fork would copy half-way
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for _ in pool.imap_unordered(functools.partial(write_shard, plan), todo):
                    progress.update()

    missing = sorted(set(range(num_shards)) - _finished_shards(out, num_shards))
    if missing:
        logging.warning("%s: shards %s of other processes are not finished yet; the process that finishes last writes "
                     "index.json", out, missing)
        return None
    shards = [{"file": shard_name(s, num_shards), **json.loads((out / f"{shard_name(s, num_shards)}.json").read_text())}
              for s in range(num_shards)]
    if not sum(s["documents"] for s in shards):
        raise ValueError(f"no documents in {list(inputs)}")
    index = StoreIndex(seq_len, params["tokenizer"], shards, [str(f) for f in files])
    index.write(out)
    return index


def _start_store(output: str, params: dict) -> epath.Path:
    """The store's directory, created, with `prepare.json` holding `params`; ValueError if it holds finished shards
    prepared with other parameters (a rerun must not mix two stores)."""
    check_bucket(output)
    out = epath.Path(output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {output} is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    path = out / PARAMS_FILE
    before = json.loads(path.read_text()) if path.exists() else None
    if before == params:
        return out
    if before is not None and any(p.name.endswith(".arrayrecord.json") for p in out.iterdir()):
        changed = [k for k in params if before.get(k) != params[k]]
        detail = "; ".join(f"{k} {before.get(k)} there, {params[k]} here" for k in changed
                           if k in ("seq_len", "num_shards", "text_field"))
        raise ValueError(f"{output} holds shards prepared with other {', '.join(changed)}"
                         f"{f' ({detail})' if detail else ''}: prepare into another directory or delete it")
    # new, or replacing the parameters of a run that finished no shard
    write_text_atomically(path, json.dumps(params, indent=1))
    return out


def _finished_shards(out: epath.Path, num_shards: int) -> set[int]:
    """The shards of `out` whose sidecar exists (one directory listing)."""
    names = {p.name for p in out.iterdir()}
    return {s for s in range(num_shards) if f"{shard_name(s, num_shards)}.json" in names}
