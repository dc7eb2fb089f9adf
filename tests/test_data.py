"""Data pipeline, tokenizers and the preprocessing CLI."""

import json

import numpy as np
import pytest

from recurrent_depth.config import data_config
from recurrent_depth.data import main as data_main
from recurrent_depth.data import make_dataset
from recurrent_depth.tokenizer import (BOS, EOS, PAD, HuggingFaceTokenizer, apply_chat_template, load_tokenizer,
                                       train_sentencepiece)

SAMPLE = ("Größe und Maß — naïve café. 日本語のテキスト。 Ελληνικά. emoji 🙂🚀 math ∑ x² ≤ 𝔘.\n"
          "  two  spaces,\ttab, trailing space \n\nnew paragraph 12345")


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    corpus = path / "corpus.txt"
    rng = np.random.default_rng(0)
    words = ["the", "core", "block", "iterates", "über", "日本語", "🙂", "x²", "  ", "\t", "12", "ok."]
    corpus.write_text("\n".join(" ".join(rng.choice(words, 10)) for _ in range(2000)), encoding="utf-8")
    return train_sentencepiece([corpus], path / "sp", vocab_size=512)


def test_sentencepiece_round_trip_and_special_ids(sp_tokenizer):
    assert sp_tokenizer.decode(sp_tokenizer.encode(SAMPLE)) == SAMPLE  # byte fallback: unseen characters too
    assert (sp_tokenizer.pad_id, sp_tokenizer.bos_id, sp_tokenizer.eos_id) == (0, 2, 3)
    assert sp_tokenizer._processor.id_to_piece(2) == BOS and sp_tokenizer._processor.id_to_piece(3) == EOS


def test_huggingface_tokenizer_json_and_chat_template(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, "<|begin_header|>", "<|end_header|>", "<|end_turn|>", PAD]
    tok.train_from_iterator([SAMPLE] * 50, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = load_tokenizer("huggingface", tmp_path)
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


def _rows(config, seq_len, rows_per_batch, count):
    it = iter(make_dataset(config, batch_size=rows_per_batch, seq_len=seq_len, vocab_size=512, seed=3))
    batches = [next(it) for _ in range(count)]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_packing_loses_and_duplicates_no_token(tmp_path, sp_tokenizer):
    docs = _documents(tmp_path)
    source = [{"kind": "jsonl", "paths": str(tmp_path / "docs.jsonl"), "text_field": "body"}]
    expected = sorted(tuple([sp_tokenizer.bos_id, *sp_tokenizer.encode(d), sp_tokenizer.eos_id]) for d in docs)
    total = sum(map(len, expected))
    seq_len, per_batch = 16, 4
    count = total // (per_batch * (seq_len + 1)) + 2
    # Without document masking every label is the next token, so each row's seq_len + 1 tokens are recoverable.
    plain = _rows(_mixture_config(source, sp_tokenizer.model_file, document_masking=False), seq_len, per_batch, count)
    assert np.all(plain["labels"] != -100)
    stream = np.concatenate([np.append(x, y[-1]) for x, y in zip(plain["inputs"], plain["labels"])])
    epoch = stream[:total]  # packing keeps order: the first epoch's documents, each once, none cut short
    starts = np.flatnonzero(epoch == sp_tokenizer.bos_id)
    assert sorted(tuple(epoch[a:b]) for a, b in zip(starts, [*starts[1:], total])) == expected

    masked = _rows(_mixture_config(source, sp_tokenizer.model_file), seq_len, per_batch, count)
    np.testing.assert_array_equal(masked["inputs"], plain["inputs"])  # same packing, only masks differ
    for inputs, labels, segs, pos in zip(masked["inputs"], masked["labels"], masked["segment_ids"], masked["positions"]):
        assert segs[0] == 1 and set(np.diff(segs)) <= {0, 1}
        boundary = segs[1:] != segs[:-1]
        assert np.all(inputs[1:][boundary] == sp_tokenizer.bos_id)  # a new segment is a new document
        assert np.all(labels[:-1][boundary] == -100)  # no target across documents
        np.testing.assert_array_equal(labels[:-1][~boundary], inputs[1:][~boundary])
        assert np.all(pos[np.flatnonzero(np.concatenate([[True], boundary]))] == 0)
        assert np.all(np.diff(pos)[~boundary] == 1)


def test_without_document_masking_attention_spans_the_row_like_the_original(tmp_path, sp_tokenizer):
    _documents(tmp_path)
    config = _mixture_config([{"kind": "jsonl", "paths": str(tmp_path / "docs.jsonl"), "text_field": "body"}],
                             sp_tokenizer.model_file, document_masking=False)
    batch = next(iter(make_dataset(config, batch_size=2, seq_len=64, vocab_size=512, seed=0)))
    assert np.all(batch["segment_ids"] == 1)
    np.testing.assert_array_equal(batch["positions"][0], np.arange(64))
    assert np.all(batch["labels"] != -100)  # no padding in a packed row


def test_text_files_mixture_weights_and_process_sharding(tmp_path, sp_tokenizer):
    (tmp_path / "a.txt").write_text("alpha alpha\n\nalpha beta\n\nalpha gamma\n\nalpha delta")
    (tmp_path / "b.txt").write_text("über über\n\nüber beta")
    config = _mixture_config([{"kind": "text", "paths": str(tmp_path / "a.txt"), "weight": 3.0},
                              {"kind": "text", "paths": str(tmp_path / "b.txt"), "weight": 1.0}],
                             sp_tokenizer.model_file)
    batches = [make_dataset(config, batch_size=4, seq_len=8, vocab_size=512, seed=0, process_index=p,
                            process_count=2) for p in (0, 1)]
    first = [next(iter(b)) for b in batches]
    assert all(b["inputs"].shape == (2, 8) for b in first)  # each process reads its half of the batch
    assert not np.array_equal(first[0]["inputs"], first[1]["inputs"])


def test_prepare_cli_writes_array_records_the_pipeline_reads(tmp_path, sp_tokenizer, capsys):
    docs = _documents(tmp_path, n=10)
    assert data_main(["prepare", "--input", str(tmp_path / "docs.jsonl"), "--tokenizer", sp_tokenizer.model_file,
                      "--output", str(tmp_path / "shards"), "--shards", "2", "--text-field", "body"]) == 0
    shards = sorted((tmp_path / "shards").glob("*.arrayrecord"))
    assert len(shards) == 2
    import grain

    records = grain.sources.ArrayRecordDataSource([str(p) for p in shards])
    stored = sorted(tuple(np.frombuffer(records[i], np.int32)) for i in range(len(records)))
    assert stored == sorted(tuple([sp_tokenizer.bos_id, *sp_tokenizer.encode(d), sp_tokenizer.eos_id]) for d in docs)
    config = _mixture_config([{"kind": "array_record", "paths": str(tmp_path / "shards" / "*.arrayrecord")}], "")
    batch = next(iter(make_dataset(config, batch_size=1, seq_len=32, vocab_size=512, seed=0)))
    assert batch["inputs"][0, 0] == sp_tokenizer.bos_id and batch["inputs"].shape == (1, 32)


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
    with pytest.raises(ValueError, match="unknown data source kind"):
        make(_mixture_config([{"kind": "csv", "paths": str(tmp_path / "bad.jsonl")}], sp_tokenizer.model_file))
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(tmp_path / "oov.arrayrecord"), "group_size:1")
    writer.write(np.asarray([1, 2, 900], np.int32).tobytes())
    writer.close()
    with pytest.raises(ValueError, match="token id 900 outside the model's vocabulary"):
        make(_mixture_config([{"kind": "array_record", "paths": str(tmp_path / "oov.arrayrecord")}], ""))
