"""Row stores read by index, never up front: a store made by `prepare` (ArrayRecord shards and `index.json`, see
recurrent_depth.data.row_format) and Parquet files of token rows in the released Huginn dataset's layout (a
list-of-int column, default `input_ids`, one 4097-token row per record, documents marked only by BOS).

A store is a sequence of *windows*, the rows of the run (seq_len + 1 tokens; a longer stored row is cut into
consecutive windows, the rest dropped), grouped in *blocks*: a Parquet row group (decoded whole, so the order
visits a block's windows together) or a whole ArrayRecord store (read a record at a time).  `ShuffledRows` puts
them in a new order every epoch: the blocks by a permutation of (seed, epoch), the windows inside a block by
grain's index shuffle; window k of the endless sequence is found from k alone, so start-up reads only metadata
and memory does not grow with the store.
"""

from __future__ import annotations

import concurrent.futures
import functools
import threading
from collections import OrderedDict
from collections.abc import Sequence

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from array_record.python.array_record_module import ArrayRecordReader
from etils import epath

from recurrent_depth.data.row_format import StoreIndex, bos_starts, decode_row, row_arrays
from recurrent_depth.data.sources import expand_paths
from recurrent_depth.errors import ConfigError

HUGINN_BOS_ID = 65504  # <|begin_text|> of huginn-0125's tokenizer: where the released rows' documents begin
RELEASED_ROW_LENGTH = 4097  # tokens per row of the released dataset
PARQUET_CACHE_BLOCKS = 4  # decoded row groups kept per store (the windows of a few steps come from one or two)
OPEN_SHARDS = 64  # ArrayRecord shard readers kept open (each holds its shard's record index, ~50 KiB)
METADATA_THREADS = 32  # Parquet footers read at once at start-up (each an HTTP round trip on gs://)


def check_ids(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    """ValueError naming `where` if a token id lies outside [0, vocab_size)."""
    bad = tokens[(tokens < 0) | (tokens >= vocab_size)]
    if bad.size:
        raise ValueError(f"{where}: token id {int(bad[0])} outside the model's vocabulary [0, {vocab_size})")


def _local_path(path: epath.Path, what: str) -> str:
    uri = path.as_uri() if hasattr(path, "as_uri") else str(path)
    if not uri.startswith("file:"):
        raise ValueError(f"{what} {path}: ArrayRecord shards are read from a local or mounted path (mount the bucket "
                         "with gcsfuse, as on a TPU VM, and give the mount's path); Parquet stores read gs:// directly")
    return str(path)


class ArrayRecordStore:
    """A store made by `prepare`: one block of all its rows; start-up reads index.json only, each shard is opened
    (and checked against the index) when first read."""

    def __init__(self, directory: str | epath.Path, seq_len: int, vocab_size: int, tokenizer: dict | None):
        directory = epath.Path(directory)
        if directory.name == "index.json":
            directory = directory.parent
        self.name = str(directory)
        index = StoreIndex.read(directory)
        index.check(seq_len, tokenizer, f"the row store {directory}")
        if index.tokenizer["vocab_size"] > vocab_size:
            raise ConfigError(f"the row store {directory} was made with a tokenizer of {index.tokenizer['vocab_size']} "
                              f"tokens but the model has only {vocab_size}")
        if not index.rows:
            raise ValueError(f"the row store {directory} holds no rows")
        self.index, self.row_len, self.vocab_size = index, seq_len + 1, vocab_size
        self.pad_id = index.tokenizer["pad_id"]
        self.tokenizer = index.tokenizer
        self.shards = [s for s in index.shards if s["rows"]]
        self.files = [_local_path(directory / s["file"], "row store shard") for s in self.shards]
        self.starts = np.cumsum([0] + [s["rows"] for s in self.shards])
        self.block_sizes = np.asarray([index.rows], np.int64)
        self.readers: OrderedDict[int, ArrayRecordReader] = OrderedDict()  # the shards open now, least recent first
        self.lock = threading.Lock()

    def _reader(self, shard: int) -> ArrayRecordReader:
        """Shard `shard`'s reader, opened (and checked against the index) on first use: start-up reads only the
        index, however many shards the store has; at most OPEN_SHARDS stay open."""
        with self.lock:  # opening takes about a millisecond: threads wanting the same shard wait for one opening
            reader = self.readers.get(shard)
            if reader is None:
                reader = self.readers[shard] = self._open(self.files[shard], self.shards[shard]["rows"])
                while len(self.readers) > OPEN_SHARDS:
                    self.readers.popitem(last=False)
            self.readers.move_to_end(shard)
            return reader

    @staticmethod
    def _open(file: str, rows: int) -> ArrayRecordReader:
        if not epath.Path(file).exists():
            raise FileNotFoundError(f"row store shard {file} (listed in its index.json) does not exist")
        try:
            reader = ArrayRecordReader(file, "readahead_buffer_size:0,max_parallelism:0")
            count = reader.num_records()
        except Exception as err:  # array_record raises plain RuntimeError/ValueError for a damaged file
            raise ValueError(f"row store shard {file} is unreadable (truncated or corrupt): {err}") from None
        if count != rows:
            raise ValueError(f"row store shard {file} holds {count} rows but its index.json says {rows}: the shard "
                             "was truncated or replaced")
        return reader

    def read(self, block: int, i: int):
        """(tokens, segment ids, positions, loss mask) [seq_len + 1] of row i."""
        shard = int(np.searchsorted(self.starts, i, side="right")) - 1
        record = i - int(self.starts[shard])
        where = f"{self.files[shard]} row {record}"
        try:
            data = self._reader(shard).read([record])[0]
        except (FileNotFoundError, ValueError):
            raise
        except Exception as err:
            raise ValueError(f"{where}: unreadable record ({err})") from None
        tokens, starts, valid = decode_row(data, self.row_len, where)
        check_ids(tokens[:valid], self.vocab_size, where)
        return row_arrays(tokens, starts, valid, self.pad_id)


def _parquet_files(paths: str | Sequence[str]) -> list[epath.Path]:
    files = []
    for path in expand_paths(paths):
        files += sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no .parquet file in {paths!r}")
    return files


class ParquetStore:
    """Parquet files of token rows: blocks are row groups, found from the footers (read in parallel at start-up);
    windows of seq_len + 1 tokens, documents begin at BOS."""

    def __init__(self, paths, seq_len: int, vocab_size: int, *, column: str = "input_ids",
                 row_length: int = RELEASED_ROW_LENGTH, bos_id: int = HUGINN_BOS_ID, pad_id: int = 0):
        self.column, self.row_length, self.bos_id = column, row_length, bos_id
        self.row_len, self.vocab_size, self.pad_id, self.name = seq_len + 1, vocab_size, pad_id, str(paths)
        self.windows = row_length // self.row_len
        if not self.windows:
            raise ConfigError(f"the Parquet source {paths!r} has rows of {row_length} tokens (its row_length), "
                              f"shorter than train.seq_len + 1 = {self.row_len}")
        self.files = _parquet_files(paths)
        with concurrent.futures.ThreadPoolExecutor(min(METADATA_THREADS, len(self.files))) as pool:
            groups = list(pool.map(self._row_groups, self.files))
        self.blocks = [(f, g, n) for f, sizes in zip(self.files, groups) for g, n in enumerate(sizes) if n]
        if not self.blocks:
            raise ValueError(f"the Parquet source {paths!r} holds no rows")
        self.block_sizes = np.asarray([n * self.windows for _, _, n in self.blocks], np.int64)
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.lock, self.loading = threading.Lock(), {}  # block -> Event while one thread decodes it

    def _row_groups(self, file: epath.Path) -> list[int]:
        """Rows per row group of one file (its footer only); the column must be a list of integers."""
        if not file.exists():
            raise FileNotFoundError(f"Parquet file {file} does not exist")
        try:
            with file.open("rb") as f:
                meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema()
        except Exception as err:  # pyarrow raises ArrowInvalid/OSError for a damaged footer
            raise ValueError(f"Parquet file {file} is unreadable (truncated or corrupt): {err}") from None
        if self.column not in schema.names:
            raise ValueError(f"Parquet file {file} has no column {self.column!r} (columns: {schema.names}); set the "
                             "source's `column`")
        kind = schema.field(self.column).type
        if not (hasattr(kind, "value_type") and str(kind.value_type).startswith(("int", "uint"))):
            raise ValueError(f"Parquet file {file}: column {self.column!r} is {kind}, not a list of token ids")
        return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]

    def _decode(self, block: int) -> np.ndarray:
        """The block's rows [rows, row_length]: its row group read and decoded once."""
        file, group, rows = self.blocks[block]
        try:
            with file.open("rb") as f:
                table = pq.ParquetFile(f).read_row_group(group, columns=[self.column])
            chunks = table.column(self.column).chunks  # usually one: no copy of the values before the cast
            lengths = np.concatenate([c.value_lengths().to_numpy(zero_copy_only=False) for c in chunks])
            values = np.concatenate([c.flatten().to_numpy(zero_copy_only=False) for c in chunks])
        except Exception as err:
            raise ValueError(f"Parquet file {file}, row group {group}: unreadable ({err})") from None
        finally:
            pa.default_memory_pool().release_unused()  # Arrow's allocator would keep every decoded group's pages
        bad = np.flatnonzero(lengths != self.row_length)
        if bad.size:
            first = sum(n for f, g, n in self.blocks[:block] if f == file) + int(bad[0])
            raise ValueError(f"{file} row {first}: {int(lengths[bad[0]])} tokens, not the source's row_length "
                             f"{self.row_length}")
        return values.astype(np.int32, copy=False).reshape(rows, self.row_length)

    def _block(self, block: int) -> np.ndarray:
        while True:
            with self.lock:
                if block in self.cache:
                    self.cache.move_to_end(block)
                    return self.cache[block]
                event = self.loading.get(block)
                if event is None:
                    event = self.loading[block] = threading.Event()
                    break
            event.wait()  # another thread is decoding it
        try:
            rows = self._decode(block)
            with self.lock:
                self.cache[block] = rows
                while len(self.cache) > PARQUET_CACHE_BLOCKS:
                    self.cache.popitem(last=False)
        finally:
            with self.lock:
                del self.loading[block]
            event.set()
        return rows

    def read(self, block: int, i: int):
        """(tokens, segment ids, positions, loss mask) [seq_len + 1] of window i of a block."""
        row, window = divmod(i, self.windows)
        tokens = self._block(block)[row, window * self.row_len:(window + 1) * self.row_len]
        file, group, _ = self.blocks[block]
        check_ids(tokens, self.vocab_size, f"{file} row group {group} row {row}")
        return row_arrays(tokens, bos_starts(tokens, self.bos_id), self.row_len, self.pad_id)


class ShuffledRows:
    """A store's windows in a new order every epoch; row k of the endless sequence from k alone."""

    def __init__(self, store, seed: Sequence[int]):
        self.store, self.seed = store, tuple(seed)
        self.total = int(store.block_sizes.sum())
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # epoch -> (block order, cumulative sizes)

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        cached = self._epochs.get(epoch)
        if cached is None:
            order = np.random.default_rng([*self.seed, epoch]).permutation(len(self.store.block_sizes))
            cached = order, np.cumsum(self.store.block_sizes[order])
            if len(self._epochs) >= 4:
                self._epochs.clear()
            self._epochs[epoch] = cached
        return cached

    @functools.lru_cache(maxsize=256)  # noqa: B019  (a few blocks per epoch; a SeedSequence costs ~12 us a row)
    def _block_seed(self, epoch: int, block: int) -> int:
        """The index shuffle's seed of one block in one epoch."""
        return int(np.random.SeedSequence([*self.seed, epoch, block]).generate_state(1)[0])

    def row(self, k: int):
        epoch, i = divmod(k, self.total)
        order, ends = self._epoch(epoch)
        position = int(np.searchsorted(ends, i, side="right"))
        block, size = int(order[position]), int(self.store.block_sizes[order[position]])
        offset = i - (int(ends[position]) - size)
        if size > 1:
            offset = grain.experimental.index_shuffle(offset, max_index=size - 1, seed=self._block_seed(epoch, block),
                                                      rounds=4)
        return self.store.read(block, offset)
