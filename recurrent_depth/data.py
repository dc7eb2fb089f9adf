"""Training data: sources, tokenisation, packing into rows with segment ids, batching, as grain datasets.

Sources (a mixture with weights): plain text files (documents separated by blank lines), JSONL (one document per
line, a configurable text field) and pre-tokenized ArrayRecord files (one int32 document per record, written by
`python -m recurrent_depth.data prepare`).  Every path is an `etils.epath.Path`, so `gs://` sources work.

The global batch of step t is a function of (seed, t) and the data config only, never of the process count:
- Row j of every global batch of B rows is *lane* j.  Lane j reads shard j of B of each source: for text and
  JSONL the documents that begin in byte range j of B of the concatenated files (a JSONL line belongs to the range
  holding its first byte, a text document to the range holding the blank line before it, or the file's start),
  for ArrayRecord records j, j + B, ...  A shard with no document falls back to the whole source (tiny corpora).
- A lane packs its shard's documents (BOS/EOS added, reshuffled every epoch by (seed, source, lane, epoch)) into
  one endless token stream; its k-th row is tokens [k (L+1), (k+1)(L+1)) of that stream, found from k directly by
  a search in the epoch's cumulative document lengths.  Rows are full (no padding); segment ids number the
  document pieces of a row and positions restart at 0 in each.
- Sources mix per row: a fixed pattern of 1000 slots gives each source its share of the weights (largest
  remainder, smooth round robin); lane j's row at step t comes from slot (j * 1000 // B + t) mod 1000, and is the
  next unused row of that source in that lane.
So a process computes exactly its rows [lo, lo + B / P) of each batch, and it reads and holds only its lanes'
shards: 1/P of the corpus, split before anything is read.  Nothing depends on history, so the data-iterator state
is just the step: a checkpoint written by any number of processes resumes on any other number (or mesh).
The generated tasks ('synthetic', 'shell_game') are functions of the step already; each process keeps its rows.

  python -m recurrent_depth.data prepare --input corpus/*.jsonl --tokenizer tok.model --output shards/ [--shards 8]
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence

import grain
import ml_collections
import numpy as np
from etils import epath
from tqdm import tqdm

from recurrent_depth.losses import IGNORE_INDEX
from recurrent_depth.shell_game import ShellGameTokenizer, shell_game_batch
from recurrent_depth.synthetic import progression_batch
from recurrent_depth.tokenizer import Tokenizer, load_tokenizer

SOURCE_KINDS = ("text", "jsonl", "array_record", "chat")  # chat: recurrent_depth.chat_data
DATA_KINDS = ("synthetic", "shell_game", "mixture", "chat")  # chat: a mixture of chat sources only
MIX_PERIOD = 1000  # slots of the per-row source pattern: weights are honoured to 1 / MIX_PERIOD
# Batches computed ahead by grain's threads while the device runs the current step.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


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


# ---- reading records: whole files or one byte range of them ------------------------------------------------------
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
                yield number, _json_object(line, lambda: f"{path}:{number}", error)


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


class _Tokenize:
    """text -> [BOS, ..., EOS] int32 (module-level class: picklable for grain workers)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> np.ndarray:
        t = self.tokenizer
        return np.asarray([t.bos_id, *t.encode(text), t.eos_id], np.int32)


class _Decode:
    """An ArrayRecord record (int32 bytes) -> tokens, rejecting ids outside the vocabulary."""

    def __init__(self, vocab_size: int, name: str):
        self.vocab_size, self.name = vocab_size, name

    def __call__(self, record: bytes) -> np.ndarray:
        tokens = np.frombuffer(record, np.int32).copy()
        bad = tokens[(tokens < 0) | (tokens >= self.vocab_size)]
        if bad.size:
            raise ValueError(f"{self.name}: token id {int(bad[0])} outside the model's vocabulary [0, {self.vocab_size})")
        return tokens


def shard_documents(source: ml_collections.ConfigDict, tokenizer: Tokenizer | None, vocab_size: int, shard: int,
                    num_shards: int) -> list[np.ndarray]:
    """The tokenized documents of shard `shard` of `num_shards` of one source (the whole source if that shard
    holds none): what one lane of the global batch reads."""
    if source.kind not in SOURCE_KINDS:
        raise ValueError(f"unknown data source kind {source.kind!r}; valid kinds: {SOURCE_KINDS}")
    files = expand_paths(source.paths)
    if source.kind == "array_record":
        records = grain.sources.ArrayRecordDataSource([str(f) for f in files])
        decode = _Decode(vocab_size, str(source.paths))
        indices = range(shard, len(records), num_shards) or range(len(records))
        docs = [decode(records[i]) for i in indices]
    else:
        if tokenizer is None:
            raise ValueError(f"a {source.kind} source needs data.tokenizer.kind and data.tokenizer.path")
        text_field = source.get("text_field", "text")
        texts = read_shard(source.kind, files, shard, num_shards, text_field)
        texts = texts or (read_shard(source.kind, files, 0, 1, text_field) if num_shards > 1 else [])
        docs = list(map(_Tokenize(tokenizer), texts))
    if not docs:
        raise ValueError(f"the data source {source.paths!r} holds no documents")
    return docs


class _Lane:
    """One source's rows for one lane: its documents packed into an endless stream, reshuffled each epoch; row k
    is tokens [k L, (k+1) L) of the stream (L = row_len), computed from k alone."""

    def __init__(self, docs: Sequence[np.ndarray], row_len: int, seed: Sequence[int]):
        self.lengths = np.array([len(d) for d in docs], np.int64)
        self.starts = np.cumsum(self.lengths) - self.lengths
        self.tokens = np.concatenate(docs)
        self.total, self.row_len, self.seed = int(self.lengths.sum()), row_len, tuple(seed)
        self._epochs = {}  # epoch -> (document order, cumulative lengths in that order); read by grain threads

    def _epoch(self, epoch: int):
        cached = self._epochs.get(epoch)
        if cached is None:
            order = np.random.default_rng([*self.seed, epoch]).permutation(len(self.lengths))
            cached = order, np.cumsum(self.lengths[order])
            if len(self._epochs) >= 4:
                self._epochs.clear()
            self._epochs[epoch] = cached
        return cached

    def row(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, segment ids, positions, loss mask) [row_len] of row k: one segment per document piece; every
        token is a target."""
        pieces = []
        pos, end = k * self.row_len, (k + 1) * self.row_len
        while pos < end:
            epoch, offset = divmod(pos, self.total)
            order, ends = self._epoch(epoch)
            i = int(np.searchsorted(ends, offset, side="right"))
            doc = order[i]
            inside = offset - (int(ends[i]) - int(self.lengths[doc]))
            n = min(int(self.lengths[doc]) - inside, end - pos)
            pieces.append(self.tokens[self.starts[doc] + inside:self.starts[doc] + inside + n])
            pos += n
        segments = np.concatenate([np.full(len(p), s, np.int32) for s, p in enumerate(pieces, 1)])
        positions = np.concatenate([np.arange(len(p), dtype=np.int32) for p in pieces])
        return np.concatenate(pieces), segments, positions, np.ones(self.row_len, bool)


class _Schedule:
    """Which source each lane's row comes from at each step: a fixed pattern of MIX_PERIOD slots holding each
    source in proportion to its weight; lane j starts at slot j * MIX_PERIOD // lanes."""

    def __init__(self, weights: Sequence[float], lanes: int, names: Sequence[str]):
        for w, name in zip(weights, names):
            if not w > 0:
                raise ValueError(f"data source {name!r}: weight must be positive, got {w!r}")
        share = np.asarray(weights, np.float64) / sum(weights) * MIX_PERIOD
        quota = np.floor(share).astype(np.int64)
        quota[np.argsort(quota - share)[:MIX_PERIOD - quota.sum()]] += 1  # largest remainders
        for q, name in zip(quota, names):
            if q == 0:
                raise ValueError(f"data source {name!r}: weight below 1/{MIX_PERIOD} of the total")
        credit, pattern = np.zeros(len(quota), np.int64), []
        for _ in range(MIX_PERIOD):  # smooth weighted round robin: sources interleave evenly
            credit += quota
            pattern.append(int(np.argmax(credit)))
            credit[pattern[-1]] -= MIX_PERIOD
        self.pattern, self.quota = np.asarray(pattern), quota
        self.prefix = np.concatenate([np.zeros((1, len(quota)), np.int64),
                                      np.cumsum(np.eye(len(quota), dtype=np.int64)[pattern], axis=0)])
        self.offsets = [j * MIX_PERIOD // lanes for j in range(lanes)]

    def _count(self, n: int) -> np.ndarray:  # [sources] slots of each source among the first n
        return (n // MIX_PERIOD) * self.quota + self.prefix[n % MIX_PERIOD]

    def __call__(self, lane: int, step: int) -> tuple[int, int]:
        """(source, row of that source in this lane) of the lane's row at `step`."""
        o = self.offsets[lane]
        source = int(self.pattern[(o + step) % MIX_PERIOD])
        return source, int(self._count(o + step)[source] - self._count(o)[source])


class _MixtureBatch:
    """step -> this process's rows of the global batch, as model inputs [rows, seq]."""

    def __init__(self, lanes: dict[int, list], schedule: _Schedule, document_masking: bool):
        self.lanes, self.schedule = lanes, schedule  # lanes: global row -> one lane (_Lane, ChatLane) per source
        self.to_model = _ToModelBatch(document_masking)

    def __call__(self, step: int) -> dict:
        rows = []
        for j, per_source in self.lanes.items():
            source, k = self.schedule(j, step)
            rows.append(per_source[source].row(k))
        tokens, segments, positions, loss_mask = (np.stack(x) for x in zip(*rows))
        return self.to_model({"tokens": tokens, "tokens_segment_ids": segments, "tokens_positions": positions,
                              "tokens_loss_mask": loss_mask})


class _ToModelBatch:
    """Packed rows [batch, seq+1] -> {inputs, labels, segment_ids, positions} [batch, seq]; a label is IGNORE_INDEX
    where its token is padding, outside the loss mask (if given) or, with document masking, in another document."""

    def __init__(self, document_masking: bool):
        self.document_masking = document_masking

    def __call__(self, rows: dict) -> dict:
        tokens, segments, positions = rows["tokens"], rows["tokens_segment_ids"], rows["tokens_positions"]
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        seg_in, seg_out = segments[:, :-1], segments[:, 1:]
        keep = seg_out > 0  # padding never counts in the loss
        if "tokens_loss_mask" in rows:  # e.g. only the assistant's tokens of a conversation
            keep &= rows["tokens_loss_mask"][:, 1:]
        if self.document_masking:  # and no prediction across a document boundary
            keep &= seg_out == seg_in
            batch = {"segment_ids": seg_in, "positions": positions[:, :-1]}
        else:  # the original: attention across documents, positions run along the row; padding masked out
            batch = {"segment_ids": (seg_in > 0).astype(np.int32),
                     "positions": np.broadcast_to(np.arange(inputs.shape[1], dtype=np.int32), inputs.shape).copy()}
        return {"inputs": inputs.astype(np.int32), "labels": np.where(keep, labels, IGNORE_INDEX).astype(np.int32),
                **{k: v.astype(np.int32) for k, v in batch.items()}}


def _by_step(batch_of_step) -> grain.IterDataset:
    """The endless dataset whose element i is batch_of_step(i); its iterator state is the step reached, the same
    on every process and for any process count."""
    return grain.MapDataset.range(2**62).map(batch_of_step).to_iter_dataset(READ_OPTIONS)


class _LocalRows:
    """Batch `step` of an in-process task (make_batch(step)); this process keeps rows [lo, lo + rows)."""

    def __init__(self, make_batch, lo: int, rows: int):
        self.make_batch, self.lo, self.rows = make_batch, lo, rows

    def __call__(self, step: int) -> dict:
        return {k: v[self.lo:self.lo + self.rows] for k, v in self.make_batch(step).items()}


def make_dataset(config: ml_collections.ConfigDict, *, batch_size: int, seq_len: int, vocab_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1, sources=None) -> grain.IterDataset:
    """This process's rows [p B/P, (p+1) B/P) of each global batch of B = `batch_size` rows (an endless grain
    dataset whose iterator state is the step); the global batches do not depend on the process count.

    `config` is the `data` section; `sources` overrides `config.sources` (e.g. with the held-out sources).
    Chat sources (data.kind 'chat', or kind 'chat' in a mixture) are read by recurrent_depth.chat_data.
    """
    if batch_size % process_count:
        raise ValueError(f"the batch size {batch_size} is not divisible by {process_count} processes")
    rows = batch_size // process_count
    lo = process_index * rows
    if config.kind == "synthetic":
        return _by_step(_LocalRows(functools.partial(progression_batch, batch_size, seq_len, vocab_size, seed), lo,
                                   rows))
    if config.kind == "shell_game":
        if vocab_size < ShellGameTokenizer.vocab_size:
            raise ValueError(f"the shell game has {ShellGameTokenizer.vocab_size} tokens but the model only "
                             f"{vocab_size}")
        return _by_step(_LocalRows(functools.partial(shell_game_batch, batch_size, seq_len, seed), lo, rows))
    if config.kind not in ("mixture", "chat"):
        raise ValueError(f"unknown data.kind {config.kind!r}; valid kinds: {DATA_KINDS}")
    sources = config.sources if sources is None else sources
    if not sources:
        raise ValueError("data.sources is empty: give at least one {kind, paths, weight} source")
    # data.kind 'chat': every source is a chat source (its kind may be left out).
    defaults = {"kind": "chat"} if config.kind == "chat" else {}
    sources = [ml_collections.ConfigDict({**defaults, **ml_collections.ConfigDict(s).to_dict()}) for s in sources]
    has_path = config.tokenizer.path or config.tokenizer.kind == "shell_game"
    tokenizer = load_tokenizer(config.tokenizer.kind, config.tokenizer.path) if has_path else None
    if tokenizer is not None and tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size}")
    schedule = _Schedule([float(s.get("weight", 1.0)) for s in sources], batch_size, [str(s.paths) for s in sources])
    chat = None
    if any(s.kind == "chat" for s in sources):
        from recurrent_depth.chat_data import ChatReader  # imports this module

        chat = ChatReader(config.chat, tokenizer, seq_len + 1)

    def lane(source, i, j):
        if source.kind == "chat":
            return chat.lane(source, j, batch_size, (seed, i, j))
        return _Lane(shard_documents(source, tokenizer, vocab_size, j, batch_size), seq_len + 1, (seed, i, j))

    lanes = {j: [lane(s, i, j) for i, s in enumerate(sources)] for j in range(lo, lo + rows)}
    if chat is not None:
        chat.log_skipped()
    return _by_step(_MixtureBatch(lanes, schedule, config.document_masking))


# ---- preprocessing CLI -----------------------------------------------------------------------------------
def prepare(inputs: Sequence[str], tokenizer: Tokenizer, output: str | os.PathLike, num_shards: int = 1,
            kind: str | None = None, text_field: str = "text") -> list[epath.Path]:
    """Tokenizes text/JSONL files once into ArrayRecord shards (one int32 document with BOS/EOS per record)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    files = expand_paths(list(inputs))
    output = epath.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = [output / f"data-{i:05d}-of-{num_shards:05d}.arrayrecord" for i in range(num_shards)]
    writers = [ArrayRecordWriter(str(p), "group_size:1") for p in paths]
    tokenize = _Tokenize(tokenizer)
    count = 0
    try:
        for file in tqdm(files, desc="prepare", unit="file"):
            file_kind = kind or ("jsonl" if file.suffix in (".jsonl", ".json") else "text")
            for doc in read_documents(file_kind, [file], text_field):
                writers[count % num_shards].write(tokenize(doc).tobytes())
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
