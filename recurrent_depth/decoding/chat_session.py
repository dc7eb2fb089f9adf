"""A conversation with a model: the history rendered in the tokenizer's chat template, the reply streamed as its
tokens become final, the oldest turns dropped (never the system prompt) when the context runs out.  A message the
tokenizer cannot encode (a word outside a task's vocabulary) gets a notice saying what the model understands; a
tokenizer whose chat data were one question each (`chat_template.single_turn`) starts every message anew."""

from __future__ import annotations

import sys
from typing import TextIO

import numpy as np

from recurrent_depth.data.chat_template import chat_hint, chat_stop_ids, render_chat, single_turn
from recurrent_depth.data.tokenizer import Tokenizer
from recurrent_depth.decoding.generate import generate
from recurrent_depth.decoding.parallel import parallel_generate

BUCKET = 64  # prompts are left-padded to a multiple of this, so that a conversation compiles a few times only
SAMPLERS = ("generate", "parallel")
MAX_NEW_TOKENS = 256  # the default reply length, at most half the model's context


def check_chat_template(tokenizer: Tokenizer) -> None:
    """Raises ValueError if the tokenizer cannot render a conversation (no BOS/EOS, or role headers it cannot
    encode); what the messages say is checked per message."""
    name = type(tokenizer).__name__
    if min(tokenizer.bos_id, tokenizer.eos_id) < 0:
        raise ValueError(f"the tokenizer ({name}) has no chat template: it has no BOS or EOS token")
    try:
        render_chat(tokenizer, [{"role": "system", "content": ""}, {"role": "user", "content": ""}],
                    add_generation_prompt=True)
    except ValueError as err:
        raise ValueError(f"the tokenizer ({name}) has no chat template: it cannot encode a conversation ({err})"
                         ) from None


def unreadable(tokenizer: Tokenizer, err: ValueError) -> str:
    """One line for a message the tokenizer cannot encode: why, and what the model understands where it says."""
    hint = chat_hint(tokenizer)
    return f"{err}; {hint}" if hint else f"the message cannot be encoded: {err}"


def pad_prompt(ids: list[int], room: int) -> np.ndarray:
    """[1, width] ids left-padded to a multiple of BUCKET (at most `room`, the prompt's share of the context)."""
    width = min(-(-len(ids) // BUCKET) * BUCKET, room)
    padded = np.zeros((1, width), np.int32)
    padded[0, width - len(ids):] = ids
    return padded


class _Printer:
    """Prints the text of the tokens final so far, as the stream callback reports them (row 0)."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[int, ...], out: TextIO):
        self.tokenizer, self.stops, self.out, self.shown = tokenizer, stops, out, ""

    def text(self, tokens) -> str:
        tokens = [int(t) for t in tokens if 0 <= t < self.tokenizer.vocab_size and t not in self.stops]
        return self.tokenizer.decode(tokens)

    def __call__(self, tokens, num_tokens, steps) -> None:
        text = self.text(np.asarray(tokens)[0, :int(np.asarray(num_tokens)[0])])
        text = text.rstrip("\ufffd")  # an incomplete UTF-8 character waits for its next bytes
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text


_printer: _Printer | None = None  # the session printing now; one module-level callback compiles once


def _stream(tokens, num_tokens, steps) -> None:
    if _printer is not None:
        _printer(tokens, num_tokens, steps)


class ChatSession:
    """A conversation with a model: `reply(text)` streams and returns the assistant's answer."""

    def __init__(self, model, params, tokenizer: Tokenizer, *, system: str | None = None, sampler: str = "generate",
                 max_new_tokens: int | None = None, out: TextIO = sys.stdout, **settings):
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {SAMPLERS}")
        check_chat_template(tokenizer)
        self.context = model.config.max_seq_len
        if max_new_tokens is None:  # small models (the demo's 64 positions) get room for a prompt too
            max_new_tokens = min(MAX_NEW_TOKENS, self.context // 2)
        if max_new_tokens >= self.context:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt in the model's context "
                             f"(max_seq_len={self.context})")
        self.model, self.params, self.tokenizer, self.out = model, params, tokenizer, out
        self.sampler, self.max_new_tokens, self.settings = sampler, max_new_tokens, settings
        self.system = [{"role": "system", "content": system}] if system else []
        try:
            render_chat(tokenizer, self.system)
        except ValueError as err:
            raise ValueError(f"the system prompt cannot be encoded: {unreadable(tokenizer, err)}") from None
        self.single_turn = single_turn(tokenizer)
        self.stops = chat_stop_ids(tokenizer)
        self.reset()

    def reset(self) -> None:
        self.messages = list(self.system)

    def prompt(self) -> list[int]:
        """The conversation's ids with the generation prompt; drops the oldest turns (never the system prompt)
        while it does not fit the context with max_new_tokens to spare, with a notice."""
        room = self.context - self.max_new_tokens
        alone, _ = render_chat(self.tokenizer, self.system + self.messages[-1:], add_generation_prompt=True)
        if len(alone) > room:  # not even the system prompt and the new message fit: the history stays
            del self.messages[-1]
            raise ValueError(f"the message does not fit the model's context: {len(alone)} prompt tokens, at most "
                             f"{room} with max_new_tokens={self.max_new_tokens} (max_seq_len={self.context})")
        dropped = 0
        while len(ids := render_chat(self.tokenizer, self.messages, add_generation_prompt=True)[0]) > room:
            del self.messages[len(self.system)]
            dropped += 1
        if dropped:
            self.notice(f"the conversation exceeds the context: dropped the {dropped} oldest message(s)")
        return ids

    def notice(self, text: str) -> None:
        self.out.write(f"[{text}]\n")
        self.out.flush()

    def generate(self, ids: list[int]):
        """The sampler's output for one prompt (left-padded to a bucket), streaming to self.out."""
        run = generate if self.sampler == "generate" else parallel_generate
        return run(self.model, self.params, pad_prompt(ids, self.context - self.max_new_tokens), lengths=[len(ids)],
                   max_new_tokens=self.max_new_tokens, stop_tokens=self.stops, stream=_stream, **self.settings)

    def reply(self, text: str, show_steps: bool = False) -> str | None:
        """Adds the user's message, streams the answer to `out` and returns it (None, with a notice, if the message
        was too long or has words the tokenizer cannot encode)."""
        global _printer
        if self.single_turn:
            self.reset()  # one question per conversation, as the model's chat data had them
        message = {"role": "user", "content": text}
        try:
            render_chat(self.tokenizer, [message])
        except ValueError as err:
            self.notice(unreadable(self.tokenizer, err))
            return None
        self.messages.append(message)
        try:
            ids = self.prompt()
        except ValueError as err:
            self.notice(str(err))
            return None
        _printer = printer = _Printer(self.tokenizer, self.stops, self.out)
        try:
            result = self.generate(ids)
        finally:
            _printer = None
        count = int(result.num_tokens[0])
        tokens = np.asarray(result.tokens[0, :count])
        answer = printer.text(tokens)
        if answer.startswith(printer.shown):  # whatever the stream held back
            self.out.write(answer[len(printer.shown):])
        self.out.write("\n")
        if show_steps:
            steps = np.asarray(result.steps[0, :count])
            self.notice(f"iterations per token: {' '.join(map(str, steps))} (mean {steps.mean():.1f})")
        self.messages.append({"role": "assistant", "content": answer})
        return answer
