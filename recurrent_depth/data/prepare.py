"""Tokenizing text/JSONL once into pre-tokenized ArrayRecord shards (`array_record` sources read them)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from tqdm import tqdm

from recurrent_depth.data.sources import Tokenize, expand_paths, read_documents
from recurrent_depth.data.tokenizer import Tokenizer


def prepare(inputs: Sequence[str], tokenizer: Tokenizer, output: str | os.PathLike, num_shards: int = 1,
            kind: str | None = None, text_field: str = "text") -> list[epath.Path]:
    """Tokenizes text/JSONL files once into ArrayRecord shards (one int32 document with BOS/EOS per record)."""
    files = expand_paths(list(inputs))
    output = epath.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = [output / f"data-{i:05d}-of-{num_shards:05d}.arrayrecord" for i in range(num_shards)]
    writers = [ArrayRecordWriter(str(p), "group_size:1") for p in paths]
    tokenize = Tokenize(tokenizer)
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
