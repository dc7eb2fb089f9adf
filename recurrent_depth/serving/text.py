"""A choice's text as its tokens arrive: incremental detokenization and OpenAI's stop strings.

Each new token's text is the growth of the decoded output (so a tokenizer that merges pieces, such as
SentencePiece's word boundaries, reads right); an incomplete UTF-8 character at the end waits for its next bytes,
and so does an ending that may be the start of a stop string.  A stop string ends the choice: its text is cut just
before it, as OpenAI does.  The streamed deltas add up to the non-streamed text, which is built the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

from recurrent_depth.data.tokenizer import Tokenizer


class ChoiceText:
    """The text of one choice: `add(token)` returns the new text that is final (and whether a stop string ended
    the choice); `finish()` what was held back at the end."""

    def __init__(self, tokenizer: Tokenizer | None, skip_ids: Sequence[int] = (), stops: Sequence[str] = ()):
        self.tokenizer, self.skip, self.stops = tokenizer, frozenset(skip_ids), tuple(stops)
        self.ids: list[int] = []  # the ids that have text (no stop ids, none outside the tokenizer's vocabulary)
        self.text = ""  # final so far
        self.stopped = False  # a stop string ended the choice

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.ids) if self.tokenizer is not None and self.ids else ""

    def _cut(self, text: str) -> str | None:
        """`text` up to its first stop string, or None if it holds none (searched from where final text ends)."""
        found = [i for stop in self.stops if (i := text.find(stop, len(self.text))) >= 0]
        return text[:min(found)] if found else None

    def _held(self, text: str) -> int:
        """How many characters at the end of `text` may still become a stop string or a UTF-8 character."""
        held = len(text) - len(text.rstrip("\ufffd"))
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    held = max(held, k)
                    break
        return held

    def _advance(self, text: str) -> str:
        if not text.startswith(self.text) or len(text) <= len(self.text):
            return ""  # a tokenizer that rewrote earlier text: the choice keeps what it already sent
        delta, self.text = text[len(self.text):], text
        return delta

    def add(self, token: int) -> tuple[str, bool]:
        """The text that became final with `token`, and whether a stop string ended the choice."""
        if self.stopped or self.tokenizer is None:
            return "", self.stopped
        if token in self.skip or not 0 <= token < self.tokenizer.vocab_size:
            return "", False
        self.ids.append(int(token))
        text = self._decoded()
        cut = self._cut(text)
        if cut is not None:
            self.stopped = True
            return self._advance(cut), True
        return self._advance(text[:len(text) - self._held(text)]), False

    def finish(self) -> str:
        """The held-back text at the end of the choice (an unfinished stop string is text after all)."""
        if self.stopped or self.tokenizer is None:
            return ""
        text = self._decoded()
        cut = self._cut(text)
        self.stopped = cut is not None
        return self._advance(text if cut is None else cut)
