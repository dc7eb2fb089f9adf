"""Data pipeline and tokenizers (the preprocessing CLI: test_prepare.py)."""

import json

import numpy as np
import pytest
from etils import epath

from recurrent_depth.data.config import data_config
from recurrent_depth.data.pipeline import make_dataset
from recurrent_depth.data.sources import read_documents, read_shard
from recurrent_depth.data.tokenizer import (
    BOS,
    EOS,
    HuggingFaceTokenizer,
    apply_chat_template,
)

from helpers import train_huginn_style_tokenizer

SAMPLE = ("Größe und Maß — naïve café. 日本語のテキスト。 Ελληνικά. emoji 🙂🚀 math ∑ x² ≤ 𝔘.\n"
          "  two  spaces,\ttab, trailing space \n\nnew paragraph 12345")


def test_sentencepiece_round_trip_and_special_ids(sp_tokenizer):
    assert sp_tokenizer.decode(sp_tokenizer.encode(SAMPLE)) == SAMPLE  # byte fallback: unseen characters too
    assert (sp_tokenizer.pad_id, sp_tokenizer.bos_id, sp_tokenizer.eos_id) == (0, 2, 3)
    assert sp_tokenizer._processor.id_to_piece(2) == BOS and sp_tokenizer._processor.id_to_piece(3) == EOS


def test_huggingface_tokenizer_json_and_chat_template(tmp_path):
    hf = train_huginn_style_tokenizer(tmp_path, SAMPLE)
    assert isinstance(hf, HuggingFaceTokenizer)
    assert hf.decode(hf.encode(SAMPLE)) == SAMPLE
    assert (hf.bos_id, hf.eos_id, hf.pad_id) == (0, 1, 5)
    chat = apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": " 2+2? "}])
    assert chat == (f"{BOS}<|begin_header|>system<|end_header|>\n\nBe brief.<|end_turn|>"
                    "<|begin_header|>user<|end_header|>\n\n2+2?<|end_turn|><|begin_header|>Huginn<|end_header|>\n\n")
    ids = hf.encode(chat)
    assert ids[0] == hf.bos_id and hf.token_id("<|end_turn|>") in ids


def _mixture_config(sources, tokenizer_path, document_masking=True):
    config = data_config()
    config.kind = "mixture"
    config.sources = sources
    config.tokenizer.path = str(tokenizer_path)
    config.document_masking = document_masking
    return config


def _documents(tmp_path, n=40):
    rng = np.random.default_rng(1)
    docs = [" ".join(rng.choice(["alpha", "beta", "gamma", "über", "🙂"], rng.integers(1, 30))) for _ in range(n)]
    with open(tmp_path / "docs.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"body": d}) + "\n")
    return docs


def _rows(config, seq_len, batch_size, count, rows=None):
    it = iter(make_dataset(config, batch_size=batch_size, seq_len=seq_len, vocab_size=512, seed=3, rows=rows))
    return _stack([next(it) for _ in range(count)])


def _stack(batches):
    """{key: [steps, rows, seq]} of a list of batches."""
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def _tokenized(tokenizer, docs):
    return sorted(tuple([tokenizer.bos_id, *tokenizer.encode(d), tokenizer.eos_id]) for d in docs)


def test_packing_loses_and_duplicates_no_token(tmp_path, sp_tokenizer):
    docs = _documents(tmp_path)
    source = [{"kind": "jsonl", "paths": str(tmp_path / "docs.jsonl"), "text_field": "body"}]
    seq_len, batch = 16, 4
    expected = _tokenized(sp_tokenizer, docs)
    total = sum(map(len, expected))
    count = total // (seq_len + 1) // batch + 2
    # Without document masking every label is the next token, so each row's seq_len + 1 tokens are recoverable.
    plain = _rows(_mixture_config(source, sp_tokenizer.model_file, document_masking=False), seq_len, batch, count)
    assert np.all(plain["labels"] != -100)
    # Global row g = step * batch + j is row g of the source: its documents packed into one stream.
    stream = np.concatenate([np.append(x, y[-1]) for x, y in zip(plain["inputs"].reshape(-1, seq_len),
                                                                 plain["labels"].reshape(-1, seq_len))])
    epoch = stream[:total]  # the first epoch: each document once, none cut short
    starts = np.flatnonzero(epoch == sp_tokenizer.bos_id)
    assert sorted(tuple(epoch[a:b]) for a, b in zip(starts, [*starts[1:], total])) == expected

    masked = _rows(_mixture_config(source, sp_tokenizer.model_file), seq_len, batch, count)
    np.testing.assert_array_equal(masked["inputs"], plain["inputs"])  # same packing, only masks differ
    for inputs, labels, segs, pos in zip(*(masked[k].reshape(-1, seq_len)
                                           for k in ("inputs", "labels", "segment_ids", "positions"))):
        assert segs[0] == 1 and set(np.diff(segs)) <= {0, 1}
        boundary = segs[1:] != segs[:-1]
        assert np.all(inputs[1:][boundary] == sp_tokenizer.bos_id)  # a new segment is a new document
        assert np.all(labels[:-1][boundary] == -100)  # no target across documents
        np.testing.assert_array_equal(labels[:-1][~boundary], inputs[1:][~boundary])
        assert np.all(pos[np.flatnonzero(np.concatenate([[True], boundary]))] == 0)
        assert np.all(np.diff(pos)[~boundary] == 1)


def test_global_batch_is_the_same_for_any_process_count_and_resumes_across_counts(tmp_path, sp_tokenizer):
    docs = _documents(tmp_path)
    (tmp_path / "b.txt").write_text("\n\n".join("core " * (i + 1) for i in range(12)))
    config = _mixture_config([{"kind": "jsonl", "paths": str(tmp_path / "docs.jsonl"), "text_field": "body",
                               "weight": 3.0}, {"kind": "text", "paths": str(tmp_path / "b.txt"), "weight": 1.0}],
                             sp_tokenizer.model_file)
    steps, lanes = 25, 8  # lanes: rows of a batch
    whole = _rows(config, 8, lanes, steps)
    for count in (2, 4):  # processes, each reading its rows of the batch
        share = lanes // count
        parts = [_rows(config, 8, lanes, steps, range(p * share, (p + 1) * share)) for p in range(count)]
        for key, value in whole.items():
            np.testing.assert_array_equal(np.concatenate([part[key] for part in parts], axis=1), value)
    replica = _rows(config, 8, lanes, steps, [1, 6])  # any rows, e.g. a replica's, are those of the whole batch
    np.testing.assert_array_equal(replica["inputs"], whole["inputs"][:, [1, 6]])
    # Rows mix the sources by weight: a row of the text source holds a token no JSONL document has.
    core = set(sp_tokenizer.encode("core ")) - {t for d in docs for t in sp_tokenizer.encode(d)}
    from_text = np.mean([bool(set(row) & core) for row in whole["inputs"].reshape(-1, 8)])
    assert abs(from_text - 0.25) < 0.05, from_text

    # The iterator state of 2 processes after 5 steps puts 1 process at step 5.
    it = iter(make_dataset(config, batch_size=lanes, seq_len=8, vocab_size=512, seed=3, rows=range(4, 8)))
    for _ in range(5):
        next(it)
    single = iter(make_dataset(config, batch_size=lanes, seq_len=8, vocab_size=512, seed=3))
    single.set_state(json.loads(json.dumps(it.get_state())))
    np.testing.assert_array_equal(next(single)["inputs"], whole["inputs"][5])


def test_processes_read_disjoint_byte_ranges_whose_union_is_the_corpus(tmp_path):
    rng = np.random.default_rng(2)
    words = ["alpha", "beta", "über", "🙂", "x²"]
    docs = [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(60)]
    text_docs = [d.replace(" ", "\n", 1) for d in docs]  # multi-line documents
    with open(tmp_path / "a.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + ("\n\n" if i % 5 == 0 else "\n") for i, d in enumerate(docs[:40]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[40:]))
    (tmp_path / "a.txt").write_text("\n\n" + "\n\n\n".join(text_docs[:30]) + "\n")
    (tmp_path / "b.txt").write_text("\n \n".join(text_docs[30:]))
    for kind, files, expected in (("jsonl", ["a.jsonl", "b.jsonl"], docs), ("text", ["a.txt", "b.txt"], text_docs)):
        files = [tmp_path / f for f in files]
        assert read_documents(kind, files) == expected
        for processes in (2, 3, 16):
            shares = [read_shard(kind, files, p, processes) for p in range(processes)]
            assert all(shares)
            assert [d for share in shares for d in share] == expected  # disjoint, in order, together the corpus


def test_without_document_masking_attention_spans_the_row_like_the_original(tmp_path, sp_tokenizer):
    _documents(tmp_path)
    config = _mixture_config([{"kind": "jsonl", "paths": str(tmp_path / "docs.jsonl"), "text_field": "body"}],
                             sp_tokenizer.model_file, document_masking=False)
    batch = next(iter(make_dataset(config, batch_size=2, seq_len=64, vocab_size=512, seed=0)))
    assert np.all(batch["segment_ids"] == 1)
    np.testing.assert_array_equal(batch["positions"][0], np.arange(64))
    assert np.all(batch["labels"] != -100)  # no padding in a packed row


def test_bad_data_inputs(tmp_path, sp_tokenizer):
    make = lambda cfg: next(iter(make_dataset(cfg, batch_size=2, seq_len=8, vocab_size=512, seed=0)))  # noqa
    with pytest.raises(FileNotFoundError, match="no data file matches"):
        make(_mixture_config([{"kind": "jsonl", "paths": str(tmp_path / "none*.jsonl")}], sp_tokenizer.model_file))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no documents"):
        make(_mixture_config([{"kind": "text", "paths": str(tmp_path / "empty.txt")}], sp_tokenizer.model_file))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        make(_mixture_config([{"kind": "jsonl", "paths": str(tmp_path / "bad.jsonl")}], sp_tokenizer.model_file))
    (tmp_path / "nofield.jsonl").write_text('{"text": "ok"}\n' * 30 + '{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"nofield.jsonl:31: no field 'text'"):
        make(_mixture_config([{"kind": "jsonl", "paths": str(tmp_path / "nofield.jsonl")}], sp_tokenizer.model_file))
    (tmp_path / "latin1.txt").write_bytes("fine\n\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt:3: not UTF-8 text"):
        make(_mixture_config([{"kind": "text", "paths": str(tmp_path / "latin1.txt")}], sp_tokenizer.model_file))
    (tmp_path / "ok.txt").write_text("one\n\ntwo")
    with pytest.raises(ValueError, match=r"ok.txt'.*weight must be positive, got 0.0"):
        make(_mixture_config([{"kind": "text", "paths": str(tmp_path / "ok.txt"), "weight": 0.0}],
                             sp_tokenizer.model_file))
    with pytest.raises(ValueError, match=r"weight below 1/1000 of the total"):
        make(_mixture_config([{"kind": "text", "paths": str(tmp_path / "ok.txt"), "weight": 1e-4},
                              {"kind": "text", "paths": str(tmp_path / "ok.txt")}], sp_tokenizer.model_file))
    with pytest.raises(ValueError, match="unknown data source kind"):
        make(_mixture_config([{"kind": "csv", "paths": str(tmp_path / "bad.jsonl")}], sp_tokenizer.model_file))


def test_start_up_reads_a_text_source_once_whatever_the_batch(tmp_path, sp_tokenizer, monkeypatch):
    for i in range(50):
        (tmp_path / f"part-{i:02d}.txt").write_text(f"alpha {i}\n\nbeta {i}")
    path_type = type(epath.Path(tmp_path))
    stats = []
    stat = path_type.stat
    monkeypatch.setattr(path_type, "stat", lambda self: stats.append(self) or stat(self))
    config = _mixture_config([{"kind": "text", "paths": str(tmp_path / "*.txt")}], sp_tokenizer.model_file)
    batch = next(iter(make_dataset(config, batch_size=64, seq_len=8, vocab_size=512, seed=0)))
    assert batch["inputs"].shape == (64, 8) and len(stats) == 50  # each file once, not once per row of the batch
