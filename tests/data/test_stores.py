"""Row stores: Parquet files in the released Huginn dataset's layout (made here with pyarrow) and stores made by
`prepare`, read by index: every window once an epoch, a new order each epoch, only the rows a process holds, nothing
at start-up, mixtures by weight, and a clear error for each bad input."""

import collections
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from recurrent_depth.data import stores
from recurrent_depth.data.config import data_config
from recurrent_depth.data.pipeline import make_dataset
from recurrent_depth.data.row_format import StoreIndex, decode_row, row_arrays
from recurrent_depth.data.tokenizer import train_sentencepiece
from recurrent_depth.errors import ConfigError

from helpers import mixture_run_config, write_mixture_corpus

BOS, VOCAB = 2, 300
ROW_LENGTH, SEQ_LEN = 33, 15  # two windows of 16 tokens per stored row, one token left over


def write_parquet(path, rows, row_group_size=8, column="input_ids"):
    """Token rows [n, length] as a Parquet file of one list<int64> column, like the released shards."""
    table = pa.table({column: pa.array(list(np.asarray(rows, np.int64)), type=pa.list_(pa.int64()))})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def released_rows(n, seed=0, low=3, high=VOCAB):
    """[n, ROW_LENGTH] rows of random ids in [low, high) with documents starting (BOS) at random places."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(low, high, (n, ROW_LENGTH))
    rows[rng.random(rows.shape) < 0.1] = BOS
    return rows


def parquet_config(*sources, document_masking=True):
    config = data_config()
    config.kind, config.document_masking = "mixture", document_masking
    config.sources = [{"kind": "parquet", "row_length": ROW_LENGTH, "bos_id": BOS, **s} for s in sources]
    return config


def batches(config, steps, batch_size=8, rows=None, seq_len=SEQ_LEN, seed=0):
    it = iter(make_dataset(config, batch_size=batch_size, seq_len=seq_len, vocab_size=VOCAB, seed=seed, rows=rows))
    return [next(it) for _ in range(steps)]


def windows(batch_list):
    """Each row's seq_len + 1 tokens (inputs and the last label: without document masking no label is ignored)."""
    return [tuple(np.append(x, y[-1])) for b in batch_list for x, y in zip(b["inputs"], b["labels"])]


def test_released_layout_every_window_once_an_epoch_in_a_new_order(tmp_path):
    rows = released_rows(40)
    write_parquet(tmp_path / "part-0.parquet", rows[:24])
    write_parquet(tmp_path / "part-1.parquet", rows[24:], row_group_size=5)
    expected = sorted(tuple(r[w * 16:(w + 1) * 16]) for r in rows for w in range(2))  # 80 windows
    config = parquet_config({"paths": str(tmp_path)}, document_masking=False)  # a directory of shards
    got = batches(config, 20)  # two epochs of 80 rows
    first, second = windows(got[:10]), windows(got[10:])
    assert sorted(first) == expected and sorted(second) == expected and first != second

    # With document masking, documents begin at BOS: segments count them, no target crosses one.
    masked = batches(parquet_config({"paths": str(tmp_path)}), 10)
    for b, plain in zip(masked, got):
        np.testing.assert_array_equal(b["inputs"], plain["inputs"])
        for inputs, labels, segs, pos in zip(b["inputs"], b["labels"], b["segment_ids"], b["positions"]):
            starts = np.flatnonzero(inputs[1:] == BOS) + 1
            np.testing.assert_array_equal(np.flatnonzero(np.diff(segs)) + 1, starts)
            assert segs[0] == 1 and np.all(pos[starts] == 0) and np.all(labels[starts - 1] == -100)


def test_processes_read_only_their_rows_and_start_up_reads_none(tmp_path, monkeypatch):
    write_parquet(tmp_path / "a.parquet", released_rows(64))
    rows, decodes = collections.defaultdict(set), []  # per dataset: the source rows k it read
    row, decode = stores.ShuffledRows.row, stores.ParquetStore._decode
    mine = lambda store: str(tmp_path) in store.name  # (other tests' iterators may still be prefetching)
    monkeypatch.setattr(stores.ShuffledRows, "row",
                        lambda self, k: (mine(self.store) and rows[id(self)].add(k)) or row(self, k))
    monkeypatch.setattr(stores.ParquetStore, "_decode",
                        lambda self, b: (mine(self) and decodes.append(b)) or decode(self, b))
    config = parquet_config({"paths": str(tmp_path / "*.parquet")})
    parts = [make_dataset(config, batch_size=8, seq_len=SEQ_LEN, vocab_size=VOCAB, seed=0,
                          rows=range(4 * p, 4 * p + 4)) for p in (0, 1)]
    whole = make_dataset(config, batch_size=8, seq_len=SEQ_LEN, vocab_size=VOCAB, seed=0)
    assert not rows and not decodes  # start-up read the footers only
    got = [[next(it) for _ in range(3)] for it in map(iter, [*parts, whole])]
    for step in range(3):  # the processes' rows make the batch
        np.testing.assert_array_equal(np.concatenate([got[0][step]["inputs"], got[1][step]["inputs"]]),
                                      got[2][step]["inputs"])
    read = list(rows.values())  # in creation order: process 0, process 1, whole (global row g is row g here)
    assert {k % 8 for k in read[0]} == {0, 1, 2, 3} and {k % 8 for k in read[1]} == {4, 5, 6, 7}
    assert {k % 8 for k in read[2]} == set(range(8))


def test_mixtures_hit_their_weights_over_ten_thousand_rows(tmp_path):
    # Two stores whose ids (but BOS) do not overlap: a row's ids say which store it came from.
    write_parquet(tmp_path / "a.parquet", released_rows(50, seed=1, low=3, high=100), row_group_size=50)
    write_parquet(tmp_path / "b.parquet", released_rows(50, seed=2, low=100, high=VOCAB), row_group_size=50)
    config = parquet_config({"paths": str(tmp_path / "a.parquet"), "weight": 0.7},
                            {"paths": str(tmp_path / "b.parquet"), "weight": 0.3})
    got = batches(config, 50, batch_size=200, seq_len=7)
    from_a = np.concatenate([(b["inputs"] < 100).all(axis=1) for b in got])
    share = np.mean(from_a)
    assert len(from_a) == 10_000 and abs(share - 0.7) < 3 * np.sqrt(0.7 * 0.3 / 10_000), share


def test_bad_parquet_stores_are_clear_errors(tmp_path):
    def first_batch(**source):
        return batches(parquet_config(source), 1)[0]

    good = write_parquet(tmp_path / "good.parquet", released_rows(8))
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"truncated.parquet is unreadable \(truncated or corrupt\)"):
        first_batch(paths=str(truncated))
    corrupt = tmp_path / "corrupt.parquet"
    data = bytearray(good.read_bytes())
    data[8:400] = bytes(392)  # the column's pages, not the footer
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"corrupt.parquet, row group 0: unreadable"):
        first_batch(paths=str(corrupt))
    short = write_parquet(tmp_path / "short.parquet", np.full((4, 20), 5))
    with pytest.raises(ValueError, match=r"short.parquet row 0: 20 tokens, not the source's row_length 33"):
        first_batch(paths=str(short))
    with pytest.raises(ConfigError, match=r"rows of 15 tokens .*, shorter than train.seq_len \+ 1 = 16"):
        first_batch(paths=str(good), row_length=15)
    big = released_rows(8)
    big[3, 5] = VOCAB + 7
    write_parquet(tmp_path / "oov.parquet", big)
    with pytest.raises(ValueError, match=rf"oov.parquet row group 0 row 3: token id {VOCAB + 7} outside"):
        batches(parquet_config({"paths": str(tmp_path / "oov.parquet")}, document_masking=False), 4)
    write_parquet(tmp_path / "empty.parquet", np.zeros((0, ROW_LENGTH)))
    with pytest.raises(ValueError, match="holds no rows"):
        first_batch(paths=str(tmp_path / "empty.parquet"))
    write_parquet(tmp_path / "tokens.parquet", released_rows(8), column="tokens")
    with pytest.raises(ValueError, match=r"tokens.parquet has no column 'input_ids' \(columns: \['tokens'\]\)"):
        first_batch(paths=str(tmp_path / "tokens.parquet"))
    assert first_batch(paths=str(tmp_path / "tokens.parquet"), column="tokens")["inputs"].shape == (8, SEQ_LEN)
    with pytest.raises(FileNotFoundError, match="no data file matches"):
        first_batch(paths=str(tmp_path / "missing" / "*.parquet"))
    with pytest.raises(ValueError, match="weight must be positive, got 0.0"):
        first_batch(paths=str(good), weight=0.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """write_mixture_corpus: JSONL documents, their tokenizer and a row store prepared from them for seq_len 32."""
    return write_mixture_corpus(tmp_path_factory.mktemp("corpus"))


def store_config(corpus, tokenizer=True, **source):
    config = data_config()
    config.kind, config.document_masking = "mixture", False
    config.tokenizer.path = str(corpus / "sp.model") if tokenizer else ""
    config.sources = [{"kind": "array_record", "paths": str(corpus / "store"), **source}]
    return config


def test_a_prepared_store_gives_every_row_once_an_epoch_and_reads_nothing_up_front(corpus, monkeypatch):
    index = StoreIndex.read(corpus / "store")
    records = [decode_row(r, 33, "") for shard in index.shards
               for r in ArrayRecordReader(str(corpus / "store" / shard["file"])).read_all()]
    expected = sorted(tuple(row_arrays(*r)[0][:-1]) for r in records)  # the inputs (padding has no label)
    reads, opened = [], []
    read, reader = stores.ArrayRecordStore.read, stores.ArrayRecordReader
    monkeypatch.setattr(stores.ArrayRecordStore, "read",
                        lambda self, b, i: (str(corpus) in self.name and reads.append(i)) or read(self, b, i))
    monkeypatch.setattr(stores, "ArrayRecordReader", lambda path, *a: opened.append(path) or reader(path, *a))
    dataset = make_dataset(store_config(corpus), batch_size=len(records), seq_len=32, vocab_size=VOCAB, seed=0)
    assert not reads and not opened  # start-up read index.json only
    it = iter(dataset)
    epochs = [list(map(tuple, next(it)["inputs"])) for _ in range(2)]
    assert sorted(epochs[0]) == expected == sorted(epochs[1]) and epochs[0] != epochs[1]
    assert len(opened) == len(index.shards)  # each shard opened once, when first read


def test_a_store_made_for_another_run_or_damaged_is_a_clear_error(corpus, tmp_path):
    rows = StoreIndex.read(corpus / "store").rows

    def first_batch(config, seq_len=32, vocab_size=VOCAB):  # every row of the store: every shard is opened
        return next(iter(make_dataset(config, batch_size=rows, seq_len=seq_len, vocab_size=vocab_size, seed=0)))

    assert first_batch(store_config(corpus, tokenizer=False))["inputs"].shape == (rows, 32)  # no tokenizer: no check
    with pytest.raises(ConfigError, match=r"store .* holds rows for seq_len 32 but train.seq_len is 16"):
        first_batch(store_config(corpus), seq_len=16)
    other = tmp_path / "other"
    other.mkdir()
    (other / "text.txt").write_text("\n".join(f"other words {i}" for i in range(200)))
    train_sentencepiece([other / "text.txt"], other / "sp", vocab_size=290)
    config = store_config(corpus)
    config.tokenizer.path = str(other / "sp.model")
    with pytest.raises(ConfigError, match=r"made with another tokenizer \(fingerprint \w+, vocab 300\) than "
                                          r"data.tokenizer \(fingerprint \w+, vocab 290\)"):
        first_batch(config)
    with pytest.raises(ConfigError, match="tokenizer of 300 tokens but the model has only 200"):
        first_batch(store_config(corpus, tokenizer=False), vocab_size=200)

    damaged = tmp_path / "damaged"
    shutil.copytree(corpus, damaged)
    shard = damaged / "store" / StoreIndex.read(damaged / "store").shards[1]["file"]
    shard.write_bytes(shard.read_bytes()[:-200])
    with pytest.raises(ValueError, match=rf"{shard.name} holds 0 rows but its index.json says \d+: the shard was "
                                         "truncated"):
        first_batch(store_config(damaged))
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{shard.name} \(listed in its index.json\) does not exist"):
        first_batch(store_config(damaged))
    shutil.copy(damaged / "store" / StoreIndex.read(damaged / "store").shards[0]["file"], shard)
    with pytest.raises(ValueError, match=rf"{shard.name} holds \d+ rows but its index.json says \d+"):
        first_batch(store_config(damaged))
    (damaged / "store" / "index.json").unlink()
    with pytest.raises(FileNotFoundError, match="is not a row store: no index.json"):
        first_batch(store_config(damaged))
    empty = tmp_path / "empty"
    StoreIndex(32, StoreIndex.read(corpus / "store").tokenizer, [{"file": "x", "rows": 0}]).write(empty)
    with pytest.raises(ValueError, match="holds no rows"):
        first_batch(store_config(corpus, paths=str(empty)))


def test_a_parquet_store_in_a_bucket_reads_like_a_local_one(tmp_path, bucket):
    rows = released_rows(16)
    local = write_parquet(tmp_path / "part-0.parquet", rows)
    (bucket / "released").mkdir(parents=True, exist_ok=True)
    (bucket / "released" / "part-0.parquet").write_bytes(local.read_bytes())
    remote = batches(parquet_config({"paths": str(bucket / "released" / "*.parquet")}), 2)
    for a, b in zip(remote, batches(parquet_config({"paths": str(local)}), 2)):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    with pytest.raises(FileNotFoundError, match="no data file matches 'gs://bkt/missing/"):
        batches(parquet_config({"paths": str(bucket / "missing" / "*.parquet")}), 1)
    with pytest.raises(FileNotFoundError, match="gs://bkt/nothing is not a row store: no index.json"):
        batches(store_config(tmp_path, tokenizer=False, paths=str(bucket / "nothing")), 1)


def test_a_run_on_two_processes_resumes_on_one_or_four_with_the_same_rows(corpus):
    config = mixture_run_config(corpus).data  # JSONL, text, a row store and Parquet rows

    def dataset(rows=None):
        return make_dataset(config, batch_size=8, seq_len=32, vocab_size=VOCAB, seed=0, rows=rows)

    whole = iter(dataset())
    expected = [next(whole) for _ in range(8)]
    two = iter(dataset(range(4, 8)))  # process 1 of 2, checkpointed after 5 steps
    for _ in range(5):
        next(two)
    state = json.loads(json.dumps(two.get_state()))
    for count in (1, 4):
        share = 8 // count
        resumed = [iter(dataset(range(p * share, (p + 1) * share))) for p in range(count)]
        for it in resumed:
            it.set_state(state)
        for step in range(5, 8):
            parts = [next(it) for it in resumed]
            for key, value in expected[step].items():
                np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value, err_msg=key)
