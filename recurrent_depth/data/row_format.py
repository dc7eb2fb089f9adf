"""The row store format: pre-packed rows of seq_len + 1 tokens with their document boundaries, and the store's
`index.json` (row counts per shard, the tokenizer's fingerprint, seq_len), as `prepare` writes them.

A record is int32 `[tokens (row_len), valid, starts...]`: the row's tokens, how many of them are real (the rest is
padding, only in a shard's last row) and the positions in (0, valid) where a new document begins.  The Parquet
rows of the released dataset carry no boundaries; theirs come from the BOS id (`bos_starts`).  Either way a row
becomes (tokens, segment ids, positions, loss mask) by `row_arrays`: segments number the document pieces from 1,
padding is segment 0, positions restart at 0 in each piece.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
from etils import epath

from recurrent_depth.errors import ConfigError
from recurrent_depth.runtime.paths import write_text_atomically

INDEX_FILE = "index.json"
STORE_FORMAT = "recurrent-depth/rows-v1"


def encode_row(tokens: np.ndarray, starts: np.ndarray, valid: int) -> bytes:
    """One record: int32 [tokens, valid, starts...]."""
    return np.concatenate([tokens, [valid], starts]).astype(np.int32).tobytes()


def decode_row(record: bytes, row_len: int, where: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens [row_len], starts, valid) of a record; ValueError naming `where` if it is not one of row_len."""
    data = np.frombuffer(record, np.int32)
    if len(data) < row_len + 1 or not 0 < data[row_len] <= row_len:
        raise ValueError(f"{where}: not a row of {row_len} tokens ({len(record)} bytes); the store is corrupt or "
                         "was written for another seq_len")
    starts = data[row_len + 1:]
    if np.any((starts <= 0) | (starts >= data[row_len])):
        raise ValueError(f"{where}: document starts {starts.tolist()} outside the row")
    return data[:row_len], starts, int(data[row_len])


def bos_starts(tokens: np.ndarray, bos_id: int) -> np.ndarray:
    """Where documents begin in a row without stored boundaries: at each BOS after the first position."""
    return np.flatnonzero(tokens[1:] == bos_id) + 1


def row_arrays(tokens: np.ndarray, starts: np.ndarray, valid: int, pad_id: int = 0):
    """(tokens, segment ids, positions, loss mask) [row_len] of one row (see the module docstring)."""
    n = len(tokens)
    boundary = np.zeros(n, np.int32)
    boundary[starts] = 1
    segments = (1 + np.cumsum(boundary)).astype(np.int32)
    segments[valid:] = 0
    index = np.arange(n, dtype=np.int32)
    piece_start = np.maximum.accumulate(np.where(boundary > 0, index, 0))
    positions = np.where(segments > 0, index - piece_start, 0).astype(np.int32)
    tokens = np.where(segments > 0, tokens, pad_id).astype(np.int32)
    return tokens, segments, positions, np.ones(n, bool)


def tokenizer_identity(tokenizer) -> dict:
    """What a store records of its tokenizer: a fingerprint of its model and its special ids."""
    return {"fingerprint": tokenizer.fingerprint, "vocab_size": int(tokenizer.vocab_size),
            "bos_id": int(tokenizer.bos_id), "eos_id": int(tokenizer.eos_id), "pad_id": int(tokenizer.pad_id)}


def fingerprint(data: bytes | str) -> str:
    """sha256 of a tokenizer's serialized model (the same model gives the same fingerprint anywhere)."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:16]


@dataclasses.dataclass
class StoreIndex:
    """A store's `index.json`: its seq_len, its tokenizer, and each shard's file name and counts."""

    seq_len: int
    tokenizer: dict
    shards: list[dict]  # {file, rows, documents, tokens}
    inputs: list[str] = dataclasses.field(default_factory=list)
    format: str = STORE_FORMAT

    @property
    def rows(self) -> int:
        return sum(s["rows"] for s in self.shards)

    def write(self, directory: str | os.PathLike) -> None:
        """Writes index.json whole or not at all."""
        path = epath.Path(directory) / INDEX_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(path, json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def read(cls, directory: str | os.PathLike) -> StoreIndex:
        """The index of the store in `directory`; FileNotFoundError or ValueError naming it."""
        path = epath.Path(directory) / INDEX_FILE
        if not path.exists():
            raise FileNotFoundError(f"{directory} is not a row store: no {INDEX_FILE} (make one with "
                                    "`python -m recurrent_depth.cli.data prepare`)")
        try:
            data = json.loads(path.read_text())
            index = cls(**data)
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"{path}: not a row store index ({err})") from None
        if index.format != STORE_FORMAT:
            raise ValueError(f"{path}: store format {index.format!r}, this version reads {STORE_FORMAT!r}")
        return index

    def check(self, seq_len: int, tokenizer: dict | None, where: str) -> None:
        """ConfigError naming both sides if the store was made for another seq_len or tokenizer."""
        if self.seq_len != seq_len:
            raise ConfigError(f"{where} holds rows for seq_len {self.seq_len} but train.seq_len is {seq_len}; "
                              "prepare the store again with --seq_len")
        if tokenizer is not None and tokenizer["fingerprint"] != self.tokenizer["fingerprint"]:
            raise ConfigError(f"{where} was made with another tokenizer (fingerprint {self.tokenizer['fingerprint']}, "
                              f"vocab {self.tokenizer['vocab_size']}) than data.tokenizer (fingerprint "
                              f"{tokenizer['fingerprint']}, vocab {tokenizer['vocab_size']})")
