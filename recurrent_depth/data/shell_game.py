"""The shell game: the built-in reasoning task of the demo, generated in-process from a seed.

A ball starts under cup `a` of five cups `a`-`e`; each token swaps two cups.  The target at every position is the
cup that hides the ball after that swap:

    swaps:  ab  cd  bd  ae  bc
    ball:   b   b   d   d   d

Each answer is the previous answer moved by one swap, so n swaps are n steps of sequential work.  Following a
point through a product of permutations of five elements is as hard as the word problem of S5, which is
NC1-complete (Barrington 1989): unlike sums or counts, which attention can shortcut in a layer, no fixed-depth
transformer tracks it at every length (Merrill & Sabharwal 2023; Liu et al. 2023).  The depth has to come from
the iterations of the recurrent block, so the task shows test-time scaling plainly: more iterations, longer
sequences tracked.

Its chat variant (for the fine-tuning demo, configs/sft_demo.py) asks the same question as a conversation: the
user's message is the swaps, the assistant's reply the final cup, in the plain chat template of
recurrent_depth.data.chat_template (`<s> User: ab cd bd </s> Assistant: d </s>`, one token per word):

  python -m recurrent_depth.cli.shell_game chat-data --output=shell_chat.jsonl [--size=20000] [--lengths=1-16]
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from recurrent_depth.data.batch import IGNORE_INDEX

CUPS = "abcde"
SWAPS = tuple(a + b for a, b in itertools.combinations(CUPS, 2))  # ab, ac, ..., de
ROLE_WORDS = ("System:", "User:", "Assistant:")  # the plain chat template's role headers (the chat variant)
TOKENS = ("<pad>", "<s>", "</s>", *CUPS, *SWAPS, *ROLE_WORDS)
HELD_OUT = 0x5EED0E7A  # evaluation problems come from the stream [seed, HELD_OUT, i]; training from [seed, step]
CHAT_TRAIN = 0xC4A7  # chat-data problems come from [seed, CHAT_TRAIN, i]: neither training batches nor held out


class ShellGameTokenizer:
    """Words of the task, separated by spaces: a swap (`ab`, also written `ba`), a cup (`c`) or a chat role
    header (`User:`); the Tokenizer interface of recurrent_depth.data.tokenizer."""

    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = len(TOKENS)
    fingerprint = "shell-game-v1"  # its words are fixed
    # For the chat (recurrent_depth.decoding.chat_session): what a user may write, shown when a message has other
    # words; and that a conversation is one question, as in the chat variant's fine-tuning data (`chat_rows`).
    chat_hint = ("the shell game model understands swaps of two cups a-e, like 'ab cd bd', and answers where the "
                 "ball ends up (it starts under a)")
    chat_single_turn = True
    _ids = {t: i for i, t in enumerate(TOKENS)} | {b + a: TOKENS.index(a + b) for a, b in
                                                     itertools.combinations(CUPS, 2)}

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[word] for word in text.split()]
        except KeyError as err:
            raise ValueError(f"{err.args[0]!r} is neither a swap of two cups {CUPS!r} (like 'ab'), a cup nor one of "
                             f"{ROLE_WORDS}") from None

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(TOKENS[i] for i in map(int, ids) if 3 <= i < len(TOKENS))


CUP_IDS = np.arange(3, 3 + len(CUPS))  # token id of each cup
SWAP_IDS = np.arange(3 + len(CUPS), 3 + len(CUPS) + len(SWAPS))
_SWAP_CUPS = np.asarray([[CUPS.index(a), CUPS.index(b)] for a, b in SWAPS])  # [swap, 2] the cups each swap exchanges


def track(swaps: np.ndarray) -> np.ndarray:
    """The ball's cup (index into CUPS) after each swap.  swaps: [..., n] swap indices -> [..., n]."""
    ball = np.zeros(swaps.shape[:-1], np.int64)
    out = np.empty(swaps.shape, np.int64)
    for i in range(swaps.shape[-1]):
        a, b = _SWAP_CUPS[swaps[..., i], 0], _SWAP_CUPS[swaps[..., i], 1]
        ball = np.where(ball == a, b, np.where(ball == b, a, ball))
        out[..., i] = ball
    return out


def shell_game_batch(batch_size: int, seq_len: int, seed: int, step: int) -> dict:
    """Batch `step`, a pure function of (seed, step): {inputs, labels, segment_ids, positions} int32
    [batch, seq_len].  inputs: BOS then seq_len - 1 random swaps; labels: the ball's cup after each swap
    (every position but BOS is a target, so one row trains every length up to seq_len - 1)."""
    rng = np.random.default_rng([seed, step])
    swaps = rng.integers(0, len(SWAPS), (batch_size, seq_len - 1))
    inputs = np.concatenate([np.full((batch_size, 1), ShellGameTokenizer.bos_id), SWAP_IDS[swaps]], axis=1)
    labels = np.concatenate([np.full((batch_size, 1), IGNORE_INDEX), CUP_IDS[track(swaps)]], axis=1)
    ones = np.ones((batch_size, seq_len), np.int32)
    return {"inputs": inputs.astype(np.int32), "labels": labels.astype(np.int32), "segment_ids": ones,
            "positions": np.cumsum(ones, axis=1, dtype=np.int32) - 1}


def held_out_problems(size: int, seed: int, lengths: tuple[int, int],
                      stream: int = HELD_OUT) -> list[tuple[list[int], int]]:
    """`size` evaluation problems (swap token ids, the final cup's token id), lengths cycling through
    lengths[0]..lengths[1]; from a random stream that training never reads (`stream`: another one)."""
    lo, hi = lengths
    problems = []
    for i in range(size):
        swaps = np.random.default_rng([seed, stream, i]).integers(0, len(SWAPS), lo + i % (hi - lo + 1))
        problems.append((SWAP_IDS[swaps].tolist(), int(CUP_IDS[track(swaps)[-1]])))
    return problems


def chat_rows(size: int, seed: int, lengths: tuple[int, int]) -> list[dict]:
    """`size` conversations {messages: [user: the swaps, assistant: the final cup]} for chat fine-tuning, from
    their own random stream (never a held-out problem)."""
    tok = ShellGameTokenizer()
    return [{"messages": [{"role": "user", "content": tok.decode(swaps)},
                          {"role": "assistant", "content": tok.decode([cup])}]}
            for swaps, cup in held_out_problems(size, seed, lengths, stream=CHAT_TRAIN)]
