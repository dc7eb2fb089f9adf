"""Training data as grain datasets: the global batch of step t, a function of (seed, t) and the data config only.

Sources (a mixture with weights, see recurrent_depth.data.config):
- row stores, read by index and never up front: `array_record` (a store made by `prepare`) and `parquet` (token
  rows in the released Huginn dataset's layout), see recurrent_depth.data.stores;
- `text` and `jsonl` files, tokenized at start-up and packed into one endless stream per source (every process
  reads the whole source once: for small corpora), see recurrent_depth.data.packing;
- `chat` conversations, see recurrent_depth.data.chat_rows.
Every path is an `etils.epath.Path`, so `gs://` sources work (ArrayRecord through a mount).

Row j of step t's global batch of B rows is global row g = t B + j.  A fixed pattern of 1000 slots gives each
source its share of the weights (`Schedule`); g is row k of source pattern[g mod 1000], and a source finds row k
from k alone (a new order every epoch).  So a process computes exactly the rows it holds (the rows of the batch
that its devices hold, identical on replicas), reads nothing else, and nothing depends on history: the iterator
state is the step, and a checkpoint written by any number of processes resumes on any other number (or mesh).
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
from recurrent_depth.data.config import SOURCE_KINDS
from recurrent_depth.data.packing import PackedDocuments
from recurrent_depth.data.row_format import tokenizer_identity
from recurrent_depth.data.shell_game import ShellGameTokenizer, shell_game_batch
from recurrent_depth.data.sources import source_documents
from recurrent_depth.data.stores import (
    HUGINN_BOS_ID,
    RELEASED_ROW_LENGTH,
    ArrayRecordStore,
    ParquetStore,
    ShuffledRows,
)
from recurrent_depth.data.synthetic import progression_batch
from recurrent_depth.data.tokenizer import load_tokenizer
from recurrent_depth.errors import ConfigError

DATA_KINDS = ("synthetic", "shell_game", "mixture", "chat")  # chat: a mixture of chat sources only
MIX_PERIOD = 1000  # slots of the per-row source pattern: weights are honoured to 1 / MIX_PERIOD


class Schedule:
    """Which source global row g (= step * batch_size + j) comes from: a fixed pattern of MIX_PERIOD slots holding
    each source in proportion to its weight (largest remainders, smoothly interleaved); row g is row k of its
    source, k the number of earlier slots of that source."""

    def __init__(self, weights: Sequence[float], names: Sequence[str]):
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

    def __call__(self, g: int) -> tuple[int, int]:
        """(source, row of that source) of global row g."""
        source = int(self.pattern[g % MIX_PERIOD])
        return source, int((g // MIX_PERIOD) * self.quota[source] + self.prefix[g % MIX_PERIOD, source])


class _MixtureBatch:
    """step -> this process's rows of the global batch, as model inputs [rows, seq]."""

    def __init__(self, sources: list, schedule: Schedule, batch_size: int, rows: Sequence[int],
                 document_masking: bool):
        self.sources, self.schedule, self.batch_size, self.rows = sources, schedule, batch_size, rows
        self.to_model = ToModelBatch(document_masking)

    def __call__(self, step: int) -> dict:
        rows = []
        for j in self.rows:
            source, k = self.schedule(step * self.batch_size + j)
            rows.append(self.sources[source].row(k))
        tokens, segments, positions, loss_mask = (np.stack(x) for x in zip(*rows))
        return self.to_model({"tokens": tokens, "tokens_segment_ids": segments, "tokens_positions": positions,
                              "tokens_loss_mask": loss_mask})


def _by_step(batch_of_step, read_threads: int) -> grain.IterDataset:
    """The endless dataset whose element i is batch_of_step(i), computed ahead by `read_threads` threads (reading,
    Parquet decoding and slicing release the GIL); its iterator state is the step reached, the same on every
    process and for any process count."""
    options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads)
    return grain.MapDataset.range(2**62).map(batch_of_step).to_iter_dataset(options)


class _LocalRows:
    """Batch `step` of an in-process task (make_batch(step)), keeping this process's rows."""

    def __init__(self, make_batch, rows: Sequence[int]):
        self.make_batch, self.rows = make_batch, np.asarray(rows)

    def __call__(self, step: int) -> dict:
        return {k: v[self.rows] for k, v in self.make_batch(step).items()}


def _row_source(source: ml_collections.ConfigDict, i: int, *, tokenizer, chat, seq_len: int, vocab_size: int,
                seed: int):
    """Source i's rows, each found from its index k by `.row(k)`."""
    if source.kind in ("text", "jsonl"):
        return PackedDocuments(source_documents(source, tokenizer), seq_len + 1, (seed, i))
    if source.kind == "chat":
        return chat.rows(source, (seed, i))
    if source.kind == "array_record":
        identity = None if tokenizer is None else tokenizer_identity(tokenizer)
        return ShuffledRows(ArrayRecordStore(source.paths, seq_len, vocab_size, identity), (seed, i))
    if source.kind == "parquet":
        bos = source.get("bos_id", -1)
        bos = (tokenizer.bos_id if tokenizer is not None else HUGINN_BOS_ID) if bos < 0 else bos
        pad = tokenizer.pad_id if tokenizer is not None else 0
        store = ParquetStore(source.paths, seq_len, vocab_size, column=source.get("column", "input_ids"),
                             row_length=source.get("row_length", RELEASED_ROW_LENGTH), bos_id=bos, pad_id=pad)
        return ShuffledRows(store, (seed, i))
    raise ValueError(f"unknown data source kind {source.kind!r}; valid kinds: {SOURCE_KINDS}")


def _same_tokenizer(sources: Sequence, row_sources: Sequence) -> None:
    """Without data.tokenizer, the row stores of a mixture must at least share one tokenizer."""
    stores = [(s.paths, r.store.tokenizer) for s, r in zip(sources, row_sources) if s.kind == "array_record"]
    for paths, identity in stores[1:]:
        if identity["fingerprint"] != stores[0][1]["fingerprint"]:
            raise ConfigError(f"the row stores {stores[0][0]!r} and {paths!r} were made with different tokenizers "
                              f"({stores[0][1]['fingerprint']} and {identity['fingerprint']})")


def make_dataset(config: ml_collections.ConfigDict, *, batch_size: int, seq_len: int, vocab_size: int, seed: int,
                 rows: Sequence[int] | None = None, sources=None) -> grain.IterDataset:
    """This process's `rows` (global row indices, default all) of each global batch of `batch_size` rows: an
    endless grain dataset of {inputs, labels, segment_ids, positions} [len(rows), seq_len], whose iterator state is
    the step.  The global batches depend on (seed, step) and the config only.

    `config` is the `data` section; `sources` overrides `config.sources` (e.g. with the held-out sources).
    """
    rows = list(range(batch_size)) if rows is None else sorted(rows)
    if not rows or rows[0] < 0 or rows[-1] >= batch_size:
        raise ValueError(f"rows {rows[:1]}...{rows[-1:]} outside a batch of {batch_size}")
    threads = config.read_threads
    if config.kind == "synthetic":
        return _by_step(_LocalRows(functools.partial(progression_batch, batch_size, seq_len, vocab_size, seed), rows),
                        threads)
    if config.kind == "shell_game":
        if vocab_size < ShellGameTokenizer.vocab_size:
            raise ValueError(f"the shell game has {ShellGameTokenizer.vocab_size} tokens but the model only "
                             f"{vocab_size}")
        return _by_step(_LocalRows(functools.partial(shell_game_batch, batch_size, seq_len, seed), rows), threads)
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
    schedule = Schedule([float(s.get("weight", 1.0)) for s in sources], [str(s.paths) for s in sources])
    chat = ChatReader(config.chat, tokenizer, seq_len + 1) if any(s.kind == "chat" for s in sources) else None
    row_sources = [_row_source(s, i, tokenizer=tokenizer, chat=chat, seq_len=seq_len, vocab_size=vocab_size,
                               seed=seed) for i, s in enumerate(sources)]
    if tokenizer is None:
        _same_tokenizer(sources, row_sources)
    if chat is not None:
        chat.log_skipped()
    return _by_step(_MixtureBatch(row_sources, schedule, batch_size, rows, config.document_masking), threads)
