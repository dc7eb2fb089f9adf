"""Fixtures of the data tests."""

import numpy as np
import pytest

from recurrent_depth.data.tokenizer import train_sentencepiece


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    """A 512-piece SentencePiece tokenizer of varied text (non-ASCII, whitespace runs, digits)."""
    path = tmp_path_factory.mktemp("tok")
    corpus = path / "corpus.txt"
    rng = np.random.default_rng(0)
    words = ["the", "core", "block", "iterates", "über", "日本語", "🙂", "x²", "  ", "\t", "12", "ok."]
    corpus.write_text("\n".join(" ".join(rng.choice(words, 10)) for _ in range(2000)), encoding="utf-8")
    return train_sentencepiece([corpus], path / "sp", vocab_size=512)
