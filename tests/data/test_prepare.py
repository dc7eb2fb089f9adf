"""Row stores written by `prepare` and its CLI: every document once, resumable, split over processes, gs://."""

import json

import jax
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from etils import epath

from recurrent_depth.cli.data import main as data_main
from recurrent_depth.data import prepare as prepare_module
from recurrent_depth.data.prepare import pack_rows, prepare, shard_name
from recurrent_depth.data.row_format import StoreIndex, decode_row, tokenizer_identity
from recurrent_depth.data.sources import read_documents

SEQ_LEN = 15  # rows of 16 tokens: most documents span several rows


def _corpus(tmp_path, n=30, field="text") -> list:
    """docs.jsonl (n documents) and notes.txt (n // 2 documents, blank-line separated) of varied lengths."""
    rng = np.random.default_rng(1)
    words = ["core", "block", "über", "日本語", "🙂", "12", "ok."]
    docs = [" ".join(rng.choice(words, rng.integers(1, 30))) for _ in range(n + n // 2)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({field: d}) + "\n" for d in docs[:n]))
    (tmp_path / "notes.txt").write_text("\n\n".join(docs[n:]) + "\n")
    return [tmp_path / "docs.jsonl", tmp_path / "notes.txt"]


def _tokenized(tokenizer, texts) -> list[tuple]:
    return [(tokenizer.bos_id, *tokenizer.encode(t), tokenizer.eos_id) for t in texts]


def _records(out) -> list[list[bytes]]:
    """Each shard's records, in the index's order."""
    return [ArrayRecordReader(str(epath.Path(out) / s["file"])).read_all() for s in StoreIndex.read(out).shards]


def _store_documents(out, tokenizer) -> list[tuple]:
    """The documents of a store in order: its rows' valid tokens, split where a document begins (a recorded start,
    or position 0 holding BOS); checks the rows' shape, padding and starts on the way."""
    index = StoreIndex.read(out)
    row_len = index.seq_len + 1
    docs = []
    for shard, records in zip(index.shards, _records(out), strict=True):
        assert len(records) == shard["rows"]
        for i, record in enumerate(records):
            tokens, starts, valid = decode_row(record, row_len, shard["file"])
            assert len(tokens) == row_len and (valid == row_len or i == len(records) - 1)
            assert np.all(tokens[valid:] == tokenizer.pad_id)
            assert starts.tolist() == (np.flatnonzero(tokens[1:valid] == tokenizer.bos_id) + 1).tolist()
            cuts = [0, *starts.tolist(), valid]
            for j, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
                piece = tuple(tokens[a:b].tolist())
                if j == 0 and i > 0 and tokens[0] != tokenizer.bos_id:  # the previous row's document goes on
                    docs[-1] += piece
                else:
                    docs.append(piece)
    return docs


def test_pack_rows_records_starts_past_position_zero_and_pads_the_last_row():
    docs = [np.arange(3), np.arange(10, 12), np.arange(20, 25), np.arange(30, 33)]  # 13 tokens
    rows = [decode_row(r, 4, "row") for r in pack_rows(docs, 4, pad_id=-1)]
    assert [r[0].tolist() for r in rows] == [[0, 1, 2, 10], [11, 20, 21, 22], [23, 24, 30, 31], [32, -1, -1, -1]]
    assert [r[1].tolist() for r in rows] == [[3], [1], [2], []]  # the last document starts at 0 of row 3: no entry
    assert [r[2] for r in rows] == [4, 4, 4, 1]
    assert list(pack_rows([], 4, 0)) == []


def test_prepare_keeps_every_document_once_in_rows_of_seq_len_plus_one(tmp_path, sp_tokenizer):
    files = _corpus(tmp_path)
    index = prepare([str(f) for f in files], sp_tokenizer, tmp_path / "store", seq_len=SEQ_LEN, num_shards=3,
                    workers=1)
    expected = _tokenized(sp_tokenizer, read_documents("jsonl", files[:1]) + read_documents("text", files[1:]))
    stored = _store_documents(tmp_path / "store", sp_tokenizer)
    assert sorted(stored) == sorted(expected) and len(stored) == 45  # none lost, none duplicated
    assert StoreIndex.read(tmp_path / "store") == index
    assert index.seq_len == SEQ_LEN and index.tokenizer == tokenizer_identity(sp_tokenizer)
    assert index.inputs == [str(f) for f in files]
    assert [s["file"] for s in index.shards] == [shard_name(s, 3) for s in range(3)]
    assert sum(s["documents"] for s in index.shards) == 45
    assert sum(s["tokens"] for s in index.shards) == sum(map(len, expected))
    assert all(s["rows"] == -(-s["tokens"] // (SEQ_LEN + 1)) for s in index.shards)
    assert sorted(p.name for p in (tmp_path / "store").iterdir() if p.name.startswith(".")) == []  # no temporaries

    (tmp_path / "one.jsonl").write_text('{"text": "core"}\n')  # one document: shards 1 and 2 hold none
    index = prepare([str(tmp_path / "one.jsonl")], sp_tokenizer, tmp_path / "one", seq_len=SEQ_LEN, num_shards=3)
    assert [s["rows"] for s in index.shards] == [1, 0, 0] and [len(r) for r in _records(tmp_path / "one")] == [1, 0, 0]
    assert _store_documents(tmp_path / "one", sp_tokenizer) == _tokenized(sp_tokenizer, ["core"])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="the files are empty"):
        prepare([str(tmp_path / "empty.txt")], sp_tokenizer, tmp_path / "e", seq_len=SEQ_LEN)
    (tmp_path / "blank.txt").write_text("\n\n\n")
    with pytest.raises(ValueError, match="no documents in"):
        prepare([str(tmp_path / "blank.txt")], sp_tokenizer, tmp_path / "b", seq_len=SEQ_LEN)
    assert not (tmp_path / "e").exists() and not (tmp_path / "b" / "index.json").exists()


def test_a_killed_prepare_resumes_without_rewriting_finished_shards(tmp_path, sp_tokenizer, monkeypatch):
    files = [str(f) for f in _corpus(tmp_path)]
    whole = prepare(files, sp_tokenizer, tmp_path / "whole", seq_len=SEQ_LEN, num_shards=4, workers=1)
    write_shard = prepare_module.write_shard

    def killed_at_shard_2(plan, shard):
        if shard == 2:  # as if killed after the shard's file was moved into place, before its sidecar
            (tmp_path / "store" / shard_name(2, 4)).write_bytes(b"half")
            raise KeyboardInterrupt
        return write_shard(plan, shard)

    monkeypatch.setattr(prepare_module, "write_shard", killed_at_shard_2)
    with pytest.raises(KeyboardInterrupt):
        prepare(files, sp_tokenizer, tmp_path / "store", seq_len=SEQ_LEN, num_shards=4, workers=1)
    monkeypatch.undo()
    out = tmp_path / "store"
    assert not (out / "index.json").exists() and not (out / f"{shard_name(3, 4)}.json").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name.startswith(("rows-00000", "rows-00001"))}
    assert len(finished) == 4  # two shards, two sidecars
    index = prepare(files, sp_tokenizer, out, seq_len=SEQ_LEN, num_shards=4, workers=2)  # two worker processes
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == finished  # not rewritten
    assert index == whole and _records(out) == _records(tmp_path / "whole")


def test_processes_write_disjoint_shards_and_the_last_one_the_index(tmp_path, sp_tokenizer):
    files = [str(_corpus(tmp_path)[0])]
    single = prepare(files, sp_tokenizer, tmp_path / "single", seq_len=SEQ_LEN, num_shards=3, workers=1)
    assert prepare(files, sp_tokenizer, tmp_path / "multi", seq_len=SEQ_LEN, num_shards=3, process_index=0,
                   process_count=2) is None  # shards 0 and 2; shard 1 is process 1's
    assert not (tmp_path / "multi" / "index.json").exists()
    assert not (tmp_path / "multi" / shard_name(1, 3)).exists()
    assert prepare(files, sp_tokenizer, tmp_path / "multi", seq_len=SEQ_LEN, num_shards=3, process_index=1,
                   process_count=2) == single
    assert _records(tmp_path / "multi") == _records(tmp_path / "single")
    assert _store_documents(tmp_path / "multi", sp_tokenizer) == _tokenized(sp_tokenizer, read_documents(
        "jsonl", [epath.Path(files[0])]))  # one kind of file: the store keeps the files' order
    with pytest.raises(ValueError, match="process_index 2 is not in"):
        prepare(files, sp_tokenizer, tmp_path / "x", seq_len=SEQ_LEN, process_index=2, process_count=2)


def test_the_cli_takes_its_process_from_jax_distributed_unless_flags_give_it(tmp_path, sp_tokenizer, monkeypatch,
                                                                             capsys):
    _corpus(tmp_path)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    command = ["prepare", f"--input={tmp_path / 'docs.jsonl'}", f"--tokenizer={sp_tokenizer.model_file}",
               f"--output={tmp_path / 'store'}", f"--seq_len={SEQ_LEN}", "--shards=2"]
    assert data_main(command) == 0
    assert capsys.readouterr().out.startswith("process 1 of 2 wrote its shards")
    assert (tmp_path / "store" / f"{shard_name(1, 2)}.json").exists()
    assert not (tmp_path / "store" / shard_name(0, 2)).exists()
    assert data_main([*command, "--num_processes=2", "--process_id=0"]) == 0  # the flags win
    assert "in 2 shard(s)" in capsys.readouterr().out and StoreIndex.read(tmp_path / "store").rows > 0


def test_prepare_writes_a_store_to_gcs(tmp_path, sp_tokenizer, bucket, capsys):
    files = [str(f) for f in _corpus(tmp_path)]
    local = prepare(files, sp_tokenizer, tmp_path / "local", seq_len=SEQ_LEN, num_shards=2, workers=1)
    assert prepare(files, sp_tokenizer, "gs://bkt/store", seq_len=SEQ_LEN, num_shards=2, workers=1) == local
    assert StoreIndex.read("gs://bkt/store") == local
    for shard in local.shards:
        assert (bucket / "store" / shard["file"]).read_bytes() == (tmp_path / "local" / shard["file"]).read_bytes()
    assert data_main(["prepare", f"--input={files[0]}", f"--tokenizer={sp_tokenizer.model_file}",
                      "--output=gs://bkt/cli", f"--seq_len={SEQ_LEN}", "--workers=1"]) == 0
    assert StoreIndex.read("gs://bkt/cli").shards[0]["documents"] == 30
    assert data_main(["prepare", f"--input={files[0]}", f"--tokenizer={sp_tokenizer.model_file}",
                      "--output=gs://nobucket/store", f"--seq_len={SEQ_LEN}"]) == 1
    out, err = capsys.readouterr()
    assert "wrote" in out and "30 documents" in out and "to gs://bkt/cli" in out
    assert [line for line in err.splitlines() if ": error: " in line] == [
        "python -m recurrent_depth.cli.data: error: bucket gs://nobucket of gs://nobucket/store does not exist or "
        "cannot be read (credentials; STORAGE_EMULATOR_HOST for an emulator)"]


def test_a_rerun_with_other_parameters_is_refused(tmp_path, sp_tokenizer):
    files = [str(f) for f in _corpus(tmp_path, n=6)]
    index = prepare(files, sp_tokenizer, tmp_path / "store", seq_len=SEQ_LEN, num_shards=2)
    with pytest.raises(ValueError, match=r"store holds shards prepared with other seq_len \(seq_len 15 there, 31 "):
        prepare(files, sp_tokenizer, tmp_path / "store", seq_len=31, num_shards=2)
    with pytest.raises(ValueError, match=r"with other num_shards \(num_shards 2 there, 3 here\)"):
        prepare(files, sp_tokenizer, tmp_path / "store", seq_len=SEQ_LEN, num_shards=3)
    with pytest.raises(ValueError, match="with other inputs: prepare into another directory"):
        prepare(files[:1], sp_tokenizer, tmp_path / "store", seq_len=SEQ_LEN, num_shards=2)
    assert prepare(files, sp_tokenizer, tmp_path / "store", seq_len=SEQ_LEN, num_shards=2) == index  # unchanged
    assert StoreIndex.read(tmp_path / "store") == index


def test_prepare_cli_takes_a_comma_separated_list_of_files_and_globs(tmp_path, sp_tokenizer, capsys):
    _corpus(tmp_path, n=6, field="body")
    (tmp_path / "more").mkdir()
    for i in range(2):
        (tmp_path / "more" / f"part{i}.jsonl").write_text(json.dumps({"body": f"doc {i}"}) + "\n")
    out, tok = tmp_path / "store", f"--tokenizer={sp_tokenizer.model_file}"
    inputs = f"--input={tmp_path / 'docs.jsonl'},{tmp_path / 'more' / 'part*.jsonl'}"
    assert data_main(["prepare", inputs, tok, f"--output={out}", "--seq_len=15"]) == 1  # no field `text`
    assert data_main(["prepare", inputs, tok, f"--output={out}", "--seq_len=15", "--shards=2", "--text_field=body",
                      "--workers=2"]) == 0  # the file and both files the pattern matches, in two processes
    assert sum(s["documents"] for s in StoreIndex.read(out).shards) == 6 + 2
    assert len(list(out.glob("*.arrayrecord"))) == 2
    first = capsys.readouterr()
    assert "rows of 16 tokens (8 documents" in first.out
    o = f"--output={tmp_path / 'o'}"
    assert data_main(["prepare", f"--input={tmp_path / 'docs.jsonl'},{tmp_path / 'none*.jsonl'}", tok, o,
                      "--seq_len=15"]) == 1
    (tmp_path / "bad.model").write_text("not a model")
    assert data_main(["prepare", inputs, f"--tokenizer={tmp_path / 'bad.model'}", o, "--seq_len=15"]) == 1
    assert data_main(["prepare", tok, o, "--seq_len=15"]) == 2
    assert data_main(["--input=x", tok, o, "--seq_len=15"]) == 2
    assert data_main(["prepare", inputs, tok, o]) == 2
    assert data_main(["prepare", inputs, tok, o, "--seq_len=15", "--num_processes=2", "--process_id=2"]) == 2
    err = [line for line in (first.err + capsys.readouterr().err).splitlines() if ": error: " in line]  # no bars
    assert len(err) == 7 and all(line.startswith("python -m recurrent_depth.cli.data: error: ") for line in err)
    assert "docs.jsonl:1: no field 'text'" in err[0] and "no data file matches" in err[1]
    assert "bad.model is not a sentencepiece tokenizer" in err[2]
    assert "--input must have a value" in err[3] and "missing command (commands: prepare)" in err[4]
    assert "--seq_len must have a value" in err[5] and "--process_id must be below --num_processes" in err[6]
    assert not (tmp_path / "o").exists()
