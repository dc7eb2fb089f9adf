"""Helpers of the server and playground tests: the tiny Huginn fixture with a word-level tokenizer, its engine,
and a server of it on 127.0.0.1."""

import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

from recurrent_depth.checkpoint.loading import find_tokenizer, load_model
from recurrent_depth.serving.app import BackgroundServer, create_app
from recurrent_depth.serving.engine import Engine

from helpers import HUGINN_TEST_SPECIALS, TINY

# The engine both test modules serve (the same settings: the second compilation comes from the persistent cache);
# one prefill length and one attention span, so that warm-up compiles few programs (test_slots_engine.py covers
# several).
ENGINE = {"slots": 4, "max_len": 64, "max_steps": 8, "max_queue": 12, "buckets": (64,), "spans": (64,)}
# 506 words and the 6 special tokens: every one of the model's 512 ids is a word of the tokenizer.
WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ra", "si", "tu", "ve", "zo", "ba", "de", "fi", "go",
                             "hu", "ja", "ke", "li", "mo", "ne", "pi", "ro", "su", "ta", "wa")
         for b in ("n", "r", "s", "t", "m", "l", "k", "p", "d", "g", "b", "x", "y", "z", "v", "w", "f", "h", "c",
                   "j", "q")][:506]


def word_checkpoint(directory: Path) -> Path:
    """The tiny fixture checkpoint (512 ids, 128 positions) with a word-level `tokenizer.json` of huginn-0125's
    special tokens and 506 words (one token per word), in `directory`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    shutil.copytree(TINY / "checkpoint", directory)
    vocab = {token: i for i, token in enumerate([*HUGINN_TEST_SPECIALS, *WORDS])}
    assert len(vocab) == json.loads((directory / "config.json").read_text())["vocab_size"]
    tok = Tokenizer(models.WordLevel(vocab, unk_token=WORDS[-1]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(HUGINN_TEST_SPECIALS))
    tok.save(str(directory / "tokenizer.json"))
    return directory


class Served:
    """The word checkpoint's model, tokenizer and engine behind a live server (`url`)."""

    def __init__(self, directory: Path, gate=None):
        self.checkpoint = word_checkpoint(directory)
        self.model, self.params = load_model(self.checkpoint)
        self.tokenizer = find_tokenizer(self.checkpoint)
        self.engine = Engine(self.model, self.params, **ENGINE)
        if gate is not None:  # the warm-up waits for the test to let it go
            start = self.engine.start
            self.engine.start = lambda: (gate.wait(60), start())
        self.app = create_app(self.engine, tokenizer=self.tokenizer, model_name="tiny-words", warm_up=True)
        self.server = BackgroundServer(self.app).start()
        self.url = self.server.url

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while get(self.url + "/health")[0] != 200:
            assert time.monotonic() < deadline, get(self.url + "/health")
            time.sleep(0.05)

    def close(self) -> None:
        self.server.stop()
        self.engine.stop()


def get(url: str) -> tuple[int, bytes]:
    """(status, body) of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=60) as res:
            return res.status, res.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def post(url: str, body: bytes | dict) -> tuple[int, dict]:
    """(status, JSON body) of a POST of raw bytes or a JSON object."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
