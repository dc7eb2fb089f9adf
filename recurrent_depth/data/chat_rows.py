"""Chat data for fine-tuning: JSONL conversations rendered with the tokenizer's chat template, targets on the
assistant's tokens only, whole conversations packed into rows with document masking.

A source of kind `chat` (`data.kind = "chat"`, or one source of a mixture) is JSONL, one conversation a line:
    {"messages": [{"role": "system" | "user" | "assistant" | "Huginn", "content": "..."}, ...]}
    {"question": "...", "answer": "..."}                     (a user turn and an assistant turn)
`data.chat.system_prompt` becomes the system turn of conversations without one.  `recurrent_depth.data.chat_template`
renders them (huginn-0125's template for its tokenizer, a plain one otherwise); its assistant mask selects the
targets (`data.chat.loss_tokens = "assistant"`: the assistant's replies and their turn ends; `"all"`: every token).

Rows hold whole conversations: every process reads the source's conversations, shuffles them every epoch by
(seed, source, epoch) and packs them in that order greedily into rows of seq_len + 1 tokens (a conversation that
does not fit starts the next row; the rest of a row is padding, segment id 0, never a target).  Row k is found
from k alone, so the iterator state is the step, as for the other sources.

A malformed row (invalid JSON, a message without role or content, an unknown role, no assistant turn, a
conversation longer than seq_len + 1 tokens unless `data.chat.truncate`) raises `ChatDataError` naming the file
and line, or with `data.chat.skip_malformed` is skipped and counted (one warning per process, at start-up).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from recurrent_depth.data.chat_template import render_chat
from recurrent_depth.data.sources import expand_paths, jsonl_lines
from recurrent_depth.data.tokenizer import Tokenizer
from recurrent_depth.errors import ChatDataError

LOSS_TOKENS = ("assistant", "all")


def conversation_messages(record: dict, system_prompt: str = "") -> list[dict]:
    """The messages of one row ({messages} or {question, answer}), with `system_prompt` as the system turn if the
    conversation has none; ValueError for a row of neither form."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"'messages' must be a non-empty list of {{role, content}}, got {messages!r:.80}")
    elif "question" in record or "answer" in record:
        question, answer = record.get("question"), record.get("answer")
        if not isinstance(question, str) or not isinstance(answer, str):
            raise ValueError("a question/answer row needs the strings 'question' and 'answer'")
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    else:
        raise ValueError(f"expected 'messages' or 'question' and 'answer', got the keys {sorted(record)}")
    if system_prompt and not any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def encode_conversation(tokenizer: Tokenizer, record: dict, options: ml_collections.ConfigDict,
                        max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [n], loss mask bool [n]) of one row: mask[t] says whether token t is a target.  ValueError
    (without the location) for a malformed row."""
    ids, mask = render_chat(tokenizer, conversation_messages(record, options.system_prompt))
    if not any(mask):
        raise ValueError("the conversation has no assistant turn")
    if len(ids) > max_len:
        if not options.truncate:
            raise ValueError(f"the conversation has {len(ids)} tokens, more than a row's {max_len} "
                             "(train.seq_len + 1; data.chat.truncate=True cuts it)")
        ids, mask = ids[:max_len], mask[:max_len]
        if not any(mask):
            raise ValueError(f"the conversation's first {max_len} tokens (train.seq_len + 1) hold no assistant token")
    mask = np.asarray(mask, bool)
    if options.loss_tokens == "all":
        mask = np.arange(len(ids)) > 0  # every token after BOS
    elif options.loss_tokens != "assistant":
        raise ValueError(f"data.chat.loss_tokens must be one of {LOSS_TOKENS}, got {options.loss_tokens!r}")
    return np.asarray(ids, np.int32), mask


class ChatReader:
    """Reads and tokenizes chat sources; counts the rows it skipped (by file and byte offset)."""

    def __init__(self, options: ml_collections.ConfigDict, tokenizer: Tokenizer | None, row_len: int):
        if tokenizer is None:
            raise ValueError("a chat source needs data.tokenizer.kind and data.tokenizer.path")
        self.options, self.tokenizer, self.row_len = options, tokenizer, row_len
        self.skipped: dict[tuple[str, int], tuple[Callable[[], str], str]] = {}  # (file, offset) -> (where, why)

    def _row(self, where: Callable[[], str], line: bytes, key: tuple[str, int]) -> tuple[np.ndarray, np.ndarray] | None:
        """One line's (ids, loss mask); None if it is malformed and skipped."""
        try:
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"malformed JSON ({getattr(err, 'msg', err)})") from None
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
            return encode_conversation(self.tokenizer, record, self.options, self.row_len)
        except ValueError as err:
            if not self.options.skip_malformed:
                raise ChatDataError(f"{where()}: {err}") from None
            self.skipped[key] = (where, str(err))
            return None

    def read(self, files: Sequence) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every usable conversation of `files`."""
        conversations = []
        for file in map(epath.Path, files):
            for offset, where, line in jsonl_lines(file, 0, file.stat().length):
                row = self._row(where, line, (str(file), offset))
                if row is not None:
                    conversations.append(row)
        return conversations

    def rows(self, source: ml_collections.ConfigDict, seed: Sequence[int]) -> ChatRows:
        """A source's conversations, packed into rows (each process reads the whole source)."""
        conversations = self.read(expand_paths(source.paths))
        if not conversations:
            raise ValueError(f"the chat source {source.paths!r} holds no usable conversation")
        return ChatRows(conversations, self.row_len, seed, self.tokenizer.pad_id)

    def log_skipped(self) -> int:
        """Warns of the rows skipped so far (data.chat.skip_malformed); returns their number."""
        if self.skipped:
            where, why = next(iter(self.skipped.values()))
            logging.warning("data.chat.skip_malformed: skipped %d malformed chat row(s) in this process's share of "
                            "the data, the first at %s: %s", len(self.skipped), where(), why)
        return len(self.skipped)


class ChatRows:
    """A source's conversations: each epoch a new order, packed greedily into rows of `row_len`
    tokens; row k computed from k (the rows of the epochs before it are counted once and remembered)."""

    def __init__(self, conversations: Sequence[tuple[np.ndarray, np.ndarray]], row_len: int, seed: Sequence[int],
                 pad_id: int):
        self.conversations, self.row_len, self.seed, self.pad_id = list(conversations), row_len, tuple(seed), pad_id
        self.lengths = np.array([len(ids) for ids, _ in self.conversations], np.int64)
        self._rows_before = [0]  # rows in the epochs before epoch e, for e = 0, 1, ...
        self._packings: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()  # grain's threads read rows concurrently

    def _packing(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order of the conversations, index in `order` where each row starts, with the end appended)."""
        cached = self._packings.get(epoch)
        if cached is None:
            order = np.random.default_rng([*self.seed, epoch]).permutation(len(self.lengths))
            starts, used = [0], 0
            for i, length in enumerate(self.lengths[order]):
                if used + length > self.row_len:
                    starts.append(i)
                    used = 0
                used += length
            starts.append(len(order))
            cached = order, np.asarray(starts)
            if len(self._packings) >= 4:
                self._packings.clear()
            self._packings[epoch] = cached
        return cached

    def _locate(self, k: int) -> tuple[int, int]:
        """(epoch, row within the epoch) of row k."""
        with self._lock:
            while self._rows_before[-1] <= k:
                epoch = len(self._rows_before) - 1
                self._rows_before.append(self._rows_before[-1] + len(self._packing(epoch)[1]) - 1)
            epoch = int(np.searchsorted(self._rows_before, k, side="right")) - 1
            return epoch, k - self._rows_before[epoch]

    def row(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, segment ids, positions, loss mask) [row_len] of row k: one segment per conversation."""
        epoch, r = self._locate(k)
        with self._lock:
            order, starts = self._packing(epoch)
        tokens = np.full(self.row_len, self.pad_id, np.int32)
        segments, positions = np.zeros(self.row_len, np.int32), np.zeros(self.row_len, np.int32)
        loss_mask = np.zeros(self.row_len, bool)
        at = 0
        for segment, i in enumerate(order[starts[r]:starts[r + 1]], 1):
            ids, mask = self.conversations[i]
            tokens[at:at + len(ids)], loss_mask[at:at + len(ids)] = ids, mask
            segments[at:at + len(ids)], positions[at:at + len(ids)] = segment, np.arange(len(ids))
            at += len(ids)
        return tokens, segments, positions, loss_mask
