"""Tokenizers: SentencePiece models trained here, and the released model's `tokenizer.json`.

Both satisfy one small interface (`encode`, `decode`, `bos_id`, `eos_id`, `pad_id`, `vocab_size`, `fingerprint`).
`pad_id` is always a valid id: a model without one (SentencePiece's default, pad_id -1) pads with EOS, which is
harmless because padding is masked out of the loss and the attention (an out-of-range id would embed as NaN).

`python -m recurrent_depth.cli.tokenizer train` trains a SentencePiece model.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Iterable, Sequence
from typing import Protocol

import sentencepiece as spm
import tokenizers

from recurrent_depth.data.row_format import fingerprint
from recurrent_depth.data.shell_game import ShellGameTokenizer
from recurrent_depth.runtime.paths import as_path

BOS, EOS, PAD = "<|begin_text|>", "<|end_text|>", "<|pad|>"  # the released model's names
HUGINN_SPECIALS = {"bos": BOS, "eos": EOS, "pad": PAD, "end_turn": "<|end_turn|>",
                   "begin_header": "<|begin_header|>", "end_header": "<|end_header|>"}


class Tokenizer(Protocol):
    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int
    fingerprint: str  # of the model: row stores record it (recurrent_depth.data.row_format)

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class SentencePieceTokenizer:
    """A SentencePiece model (local or gs://); the processor is built lazily so the object pickles (grain
    workers)."""

    def __init__(self, model_file: str | os.PathLike):
        self.model_file = str(model_file)
        if not as_path(self.model_file).exists():
            raise FileNotFoundError(f"SentencePiece model {self.model_file} does not exist")
        proto = as_path(self.model_file).read_bytes()
        sp = self._processor = spm.SentencePieceProcessor(model_proto=proto)
        self.vocab_size, self.fingerprint = sp.get_piece_size(), fingerprint(proto)
        self.bos_id, self.eos_id = sp.bos_id(), sp.eos_id()
        self.pad_id = usable_pad_id(sp.pad_id(), self.eos_id, self.vocab_size)

    @functools.cached_property
    def _processor(self):
        return spm.SentencePieceProcessor(model_proto=as_path(self.model_file).read_bytes())

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_processor"}

    def encode(self, text: str) -> list[int]:
        return self._processor.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._processor.decode(list(map(int, ids)))


class HuggingFaceTokenizer:
    """A `tokenizer.json` (e.g. huginn-0125's) through the `tokenizers` package; special ids by token name."""

    def __init__(self, path: str | os.PathLike, bos: str = BOS, eos: str = EOS, pad: str = PAD):
        path = as_path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"tokenizer file {file} does not exist")
        self._tokenizer = tokenizers.Tokenizer.from_str(file.read_text(encoding="utf-8"))
        ids = {name: self._tokenizer.token_to_id(token) for name, token in (("bos", bos), ("eos", eos), ("pad", pad))}
        missing = [name for name, value in ids.items() if value is None]
        if missing:
            raise ValueError(f"{file} has no token for {missing} ({bos!r}, {eos!r}, {pad!r} expected)")
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
        self.vocab_size = self._tokenizer.get_vocab_size()
        self.fingerprint = fingerprint(self._tokenizer.to_str())

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(map(int, ids)), skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        value = self._tokenizer.token_to_id(token)
        if value is None:
            raise ValueError(f"unknown token {token!r}")
        return value


def usable_pad_id(pad_id: int, eos_id: int, vocab_size: int) -> int:
    """The tokenizer's pad id if it has one in [0, vocab_size), else the documented fallback: EOS."""
    if 0 <= pad_id < vocab_size:
        return pad_id
    if not 0 <= eos_id < vocab_size:
        raise ValueError(f"the tokenizer has neither a pad id nor an EOS id in [0, {vocab_size}) to pad with")
    return eos_id


TOKENIZER_KINDS = ("sentencepiece", "huggingface", "shell_game")


def load_tokenizer(kind: str, path: str | os.PathLike) -> Tokenizer:
    """`kind` is 'sentencepiece' (a .model file), 'huggingface' (tokenizer.json or its directory) or
    'shell_game' (the demo task's words; no file)."""
    if kind == "shell_game":
        return ShellGameTokenizer()
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path)
    if kind == "huggingface":
        return HuggingFaceTokenizer(path)
    raise ValueError(f"unknown tokenizer kind {kind!r}; valid kinds: {TOKENIZER_KINDS}")


def apply_chat_template(messages: Iterable[dict], add_generation_prompt: bool = True) -> str:
    """huginn-0125's chat format (reference §2.8): BOS, then per message
    `<|begin_header|>{role}<|end_header|>\\n\\n{content}<|end_turn|>` with role assistant printed as Huginn."""
    parts = [BOS]
    for message in messages:
        role = "Huginn" if message["role"] in ("assistant", "Huginn") else message["role"]
        parts.append(f"<|begin_header|>{role}<|end_header|>\n\n{message['content'].strip()}<|end_turn|>")
    parts.append("<|begin_header|>Huginn<|end_header|>\n\n" if add_generation_prompt else EOS)
    return "".join(parts)


def train_sentencepiece(inputs: Sequence[str | os.PathLike], model_prefix: str | os.PathLike, vocab_size: int,
                        model_type: str = "bpe", character_coverage: float = 1.0) -> SentencePieceTokenizer:
    """Trains a SentencePiece model whose decode(encode(x)) == x exactly: identity normalisation, whitespace kept,
    byte fallback; ids 0-3 are PAD, UNK, BOS, EOS.  Reads the text and writes `<model_prefix>.model` through
    epath, so either may be in cloud storage."""
    files = [as_path(p) for p in inputs]
    missing = [str(p) for p in files if not p.exists()]
    if missing:
        raise FileNotFoundError(f"training text file(s) do not exist: {missing}")
    if not any(p.stat().length for p in files):
        raise ValueError("the training text is empty")

    def lines():  # one sentence per line, as SentencePiece reads a file
        for file in files:
            with file.open(encoding="utf-8") as f:
                yield from (line.rstrip("\n") for line in f)

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        byte_fallback=True, allow_whitespace_only_pieces=True,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece=PAD, bos_piece=BOS, eos_piece=EOS,
        hard_vocab_limit=False, minloglevel=2)
    as_path(f"{model_prefix}.model").write_bytes(model.getvalue())
    return SentencePieceTokenizer(f"{model_prefix}.model")
