"""Training data: sources, tokenisation, packing into rows with segment ids, batching, as grain datasets.

Sources (a mixture with weights): plain text files (documents separated by blank lines), JSONL (one document per
line, a configurable text field) and pre-tokenized ArrayRecord files (one int32 document per record, written by
`recurrent_depth.data.prepare`).  Every path is an `etils.epath.Path`, so `gs://` sources work.

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
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import grain
import ml_collections
import numpy as np

from recurrent_depth.data.batch import ToModelBatch
from recurrent_depth.data.chat_rows import ChatReader
from recurrent_depth.data.packing import DocumentLane
from recurrent_depth.data.shell_game import ShellGameTokenizer, shell_game_batch
from recurrent_depth.data.sources import shard_documents
from recurrent_depth.data.synthetic import progression_batch
from recurrent_depth.data.tokenizer import load_tokenizer

DATA_KINDS = ("synthetic", "shell_game", "mixture", "chat")  # chat: a mixture of chat sources only
MIX_PERIOD = 1000  # slots of the per-row source pattern: weights are honoured to 1 / MIX_PERIOD
# Batches computed ahead by grain's threads while the device runs the current step.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


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
        self.lanes, self.schedule = lanes, schedule  # lanes: global row -> one lane (DocumentLane, ChatLane) per source
        self.to_model = ToModelBatch(document_masking)

    def __call__(self, step: int) -> dict:
        rows = []
        for j, per_source in self.lanes.items():
            source, k = self.schedule(j, step)
            rows.append(per_source[source].row(k))
        tokens, segments, positions, loss_mask = (np.stack(x) for x in zip(*rows))
        return self.to_model({"tokens": tokens, "tokens_segment_ids": segments, "tokens_positions": positions,
                              "tokens_loss_mask": loss_mask})


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
    Chat sources (data.kind 'chat', or kind 'chat' in a mixture) are read by recurrent_depth.data.chat_rows.
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
        chat = ChatReader(config.chat, tokenizer, seq_len + 1)

    def lane(source, i, j):
        if source.kind == "chat":
            return chat.lane(source, j, batch_size, (seed, i, j))
        return DocumentLane(shard_documents(source, tokenizer, vocab_size, j, batch_size), seq_len + 1, (seed, i, j))

    lanes = {j: [lane(s, i, j) for i, s in enumerate(sources)] for j in range(lo, lo + rows)}
    if chat is not None:
        chat.log_skipped()
    return _by_step(_MixtureBatch(lanes, schedule, config.document_masking))
