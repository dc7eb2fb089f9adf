"""Training data with grain: sources, tokenisation, packing into rows with segment ids, batching.

Sources (a mixture with weights): plain text files (documents separated by a blank line), JSONL (one document
per line, a configurable text field) and pre-tokenized ArrayRecord files (one int32 document per record, written
by `python -m recurrent_depth.data prepare`).  Documents get BOS/EOS like the original, are shuffled by seed,
repeated by epoch, sharded per process and packed into rows of seq_len + 1 tokens; the iterator state goes into
every checkpoint, so a resumed run reads exactly the batches the interrupted one would have.

  python -m recurrent_depth.data prepare --input corpus/*.jsonl --tokenizer tok.model --output shards/ [--shards 8]
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import grain
import ml_collections
import numpy as np
from tqdm import tqdm

from recurrent_depth.losses import IGNORE_INDEX
from recurrent_depth.shell_game import ShellGameTokenizer, shell_game_batch
from recurrent_depth.synthetic import progression_batch
from recurrent_depth.tokenizer import Tokenizer, load_tokenizer

SOURCE_KINDS = ("text", "jsonl", "array_record")


def expand_paths(pattern: str | Sequence[str]) -> list[str]:
    """Files matching one glob pattern or a list of them; a pattern matching nothing is an error."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    files = []
    for p in patterns:
        matched = sorted(glob.glob(p))
        if not matched:
            raise FileNotFoundError(f"no data file matches {p!r}")
        files += matched
    return files


def jsonl_records(path: str | os.PathLike, error: type[ValueError] = ValueError) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; a malformed line raises `error` naming the
    file and line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise error(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def read_documents(kind: str, files: Sequence[str], text_field: str = "text") -> list[str]:
    """Documents of text or JSONL files; malformed JSONL names the file and line."""
    docs = []
    for file in files:
        if kind == "text":
            with open(file, encoding="utf-8") as f:
                docs += [d for d in f.read().split("\n\n") if d.strip()]
            continue
        for number, record in jsonl_records(file):
            if text_field not in record:
                raise ValueError(f"{file}:{number}: no field {text_field!r}")
            docs.append(str(record[text_field]))
    return docs


class _Tokenize:
    """text -> {'tokens': [BOS, ..., EOS]} (module-level class: picklable for grain workers)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> dict:
        t = self.tokenizer
        return {"tokens": np.asarray([t.bos_id, *t.encode(text), t.eos_id], np.int32)}


class _Decode:
    """An ArrayRecord record (int32 bytes) -> {'tokens'}, rejecting ids outside the vocabulary."""

    def __init__(self, vocab_size: int, name: str):
        self.vocab_size, self.name = vocab_size, name

    def __call__(self, record: bytes) -> dict:
        tokens = np.frombuffer(record, np.int32).copy()
        bad = tokens[(tokens < 0) | (tokens >= self.vocab_size)]
        if bad.size:
            raise ValueError(f"{self.name}: token id {int(bad[0])} outside the model's vocabulary [0, {self.vocab_size})")
        return {"tokens": tokens}


def source_dataset(source: ml_collections.ConfigDict, tokenizer: Tokenizer | None, vocab_size: int) -> grain.MapDataset:
    """Documents of one source as {'tokens'} elements."""
    if source.kind not in SOURCE_KINDS:
        raise ValueError(f"unknown data source kind {source.kind!r}; valid kinds: {SOURCE_KINDS}")
    files = expand_paths(source.paths)
    if source.kind == "array_record":
        ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(files))
        if len(ds) == 0:
            raise ValueError(f"the data source {source.paths!r} holds no documents")
        return ds.map(_Decode(vocab_size, str(source.paths)))
    if tokenizer is None:
        raise ValueError(f"a {source.kind} source needs data.tokenizer.kind and data.tokenizer.path")
    docs = read_documents(source.kind, files, source.get("text_field", "text"))
    if not docs:
        raise ValueError(f"the data source {source.paths!r} holds no documents")
    return grain.MapDataset.source(docs).map(_Tokenize(tokenizer))


class _ToModelBatch:
    """Packed rows [batch, seq+1] -> {inputs, labels, segment_ids, positions} [batch, seq]."""

    def __init__(self, document_masking: bool):
        self.document_masking = document_masking

    def __call__(self, rows: dict) -> dict:
        tokens, segments, positions = rows["tokens"], rows["tokens_segment_ids"], rows["tokens_positions"]
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        seg_in, seg_out = segments[:, :-1], segments[:, 1:]
        keep = seg_out > 0  # padding never counts in the loss
        if self.document_masking:  # and no prediction across a document boundary
            keep &= seg_out == seg_in
            batch = {"segment_ids": seg_in, "positions": positions[:, :-1]}
        else:  # the original: attention across documents, positions run along the row; padding masked out
            batch = {"segment_ids": (seg_in > 0).astype(np.int32),
                     "positions": np.broadcast_to(np.arange(inputs.shape[1], dtype=np.int32), inputs.shape).copy()}
        return {"inputs": inputs.astype(np.int32), "labels": np.where(keep, labels, IGNORE_INDEX).astype(np.int32),
                **{k: v.astype(np.int32) for k, v in batch.items()}}


def _generated(make_batch, batch_size: int, process_index: int, process_count: int) -> grain.IterDataset:
    """Batches of an in-process task: batch `step` is make_batch(step); this process keeps its rows."""
    rows = batch_size // process_count
    lo = process_index * rows

    def local(step):
        return {k: v[lo:lo + rows] for k, v in make_batch(step).items()}

    return grain.MapDataset.range(2**62).map(local).to_iter_dataset()


def make_dataset(config: ml_collections.ConfigDict, *, batch_size: int, seq_len: int, vocab_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1, sources=None) -> grain.IterDataset:
    """This process's batches of `batch_size // process_count` rows (an infinite, checkpointable grain dataset).

    `config` is the `data` section; `sources` overrides `config.sources` (e.g. with the held-out sources).
    """
    if batch_size % process_count:
        raise ValueError(f"the batch size {batch_size} is not divisible by {process_count} processes")
    if config.kind == "synthetic":
        return _generated(functools.partial(progression_batch, batch_size, seq_len, vocab_size, seed), batch_size,
                          process_index, process_count)
    if config.kind == "shell_game":
        if vocab_size < ShellGameTokenizer.vocab_size:
            raise ValueError(f"the shell game has {ShellGameTokenizer.vocab_size} tokens but the model only "
                             f"{vocab_size}")
        return _generated(functools.partial(shell_game_batch, batch_size, seq_len, seed), batch_size,
                          process_index, process_count)
    if config.kind != "mixture":
        raise ValueError(f"unknown data.kind {config.kind!r}; valid kinds: 'synthetic', 'shell_game', 'mixture'")
    sources = config.sources if sources is None else sources
    if not sources:
        raise ValueError("data.sources is empty: give at least one {kind, paths, weight} source")
    tokenizer = load_tokenizer(config.tokenizer.kind, config.tokenizer.path) if config.tokenizer.path else None
    if tokenizer is not None and tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size}")
    datasets, weights = [], []
    for i, source in enumerate(sources):
        source = ml_collections.ConfigDict(source)
        ds = source_dataset(source, tokenizer, vocab_size)
        if len(ds) < process_count:
            raise ValueError(f"data source {source.paths!r} has fewer documents than processes")
        ds = ds[process_index::process_count].seed(seed + i).shuffle().repeat(None)
        datasets.append(ds)
        weights.append(float(source.get("weight", 1.0)))
    ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
    packed = grain.experimental.ConcatThenSplitIterDataset(ds.to_iter_dataset(), length_struct={"tokens": seq_len + 1})
    return packed.batch(batch_size // process_count, drop_remainder=True).map(_ToModelBatch(config.document_masking))


# ---- preprocessing CLI -----------------------------------------------------------------------------------
def prepare(inputs: Sequence[str], tokenizer: Tokenizer, output: str | Path, num_shards: int = 1,
            kind: str | None = None, text_field: str = "text") -> list[Path]:
    """Tokenizes text/JSONL files once into ArrayRecord shards (one int32 document with BOS/EOS per record)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    files = expand_paths(list(inputs))
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = [output / f"data-{i:05d}-of-{num_shards:05d}.arrayrecord" for i in range(num_shards)]
    writers = [ArrayRecordWriter(str(p), "group_size:1") for p in paths]
    tokenize = _Tokenize(tokenizer)
    count = 0
    try:
        for file in tqdm(files, desc="prepare", unit="file"):
            file_kind = kind or ("jsonl" if file.endswith((".jsonl", ".json")) else "text")
            for doc in read_documents(file_kind, [file], text_field):
                writers[count % num_shards].write(tokenize(doc)["tokens"].tobytes())
                count += 1
    finally:
        for w in writers:
            w.close()
    if count == 0:
        raise ValueError(f"no documents in {list(inputs)}")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recurrent_depth.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize text/JSONL into ArrayRecord shards")
    p.add_argument("--input", nargs="+", required=True, help="files or glob patterns")
    p.add_argument("--tokenizer", required=True, help="a SentencePiece .model or a tokenizer.json")
    p.add_argument("--output", required=True)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--text-field", default="text")
    args = parser.parse_args(argv)
    try:
        kind = "huggingface" if args.tokenizer.endswith(".json") else "sentencepiece"
        paths = prepare(args.input, load_tokenizer(kind, args.tokenizer), args.output, args.shards,
                        text_field=args.text_field)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {len(paths)} shard(s) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
