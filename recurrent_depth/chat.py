"""Chat with a model in the terminal, tokens printed as they become final:

  python -m recurrent_depth.chat --checkpoint=huginn-0125 --num_steps=32 --system="You are a helpful assistant."

DIR is a Hugging Face checkpoint directory (its tokenizer.json is used), a parameter checkpoint or a train.py
workdir (the tokenizer its run config names), as for eval.py.  The conversation is rendered with the tokenizer's
chat template (recurrent_depth.chat_template).  When it no longer fits the model's context with room for a reply,
the oldest turns are dropped (the system prompt stays) with a notice.  Commands: /reset (a new conversation),
/quit (or end of input).
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

import numpy as np

from recurrent_depth import decoding, parallel_decoding
from recurrent_depth.chat_template import chat_stop_ids, render_chat
from recurrent_depth.tokenizer import Tokenizer

BUCKET = 64  # prompts are left-padded to a multiple of this, so that a conversation compiles a few times only
SAMPLERS = ("generate", "parallel")


def check_chat_template(tokenizer: Tokenizer) -> None:
    """Raises ValueError if the tokenizer cannot render a conversation (no BOS/EOS, or text it cannot encode)."""
    name = type(tokenizer).__name__
    if min(tokenizer.bos_id, tokenizer.eos_id) < 0:
        raise ValueError(f"the tokenizer ({name}) has no chat template: it has no BOS or EOS token")
    try:
        render_chat(tokenizer, [{"role": "system", "content": "s"}, {"role": "user", "content": "Hi!"}],
                    add_generation_prompt=True)
    except ValueError as err:
        raise ValueError(f"the tokenizer ({name}) has no chat template: it cannot encode a conversation ({err})"
                         ) from None


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
                 max_new_tokens: int = 256, out: TextIO = sys.stdout, **settings):
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {SAMPLERS}")
        check_chat_template(tokenizer)
        self.context = model.config.max_seq_len
        if max_new_tokens >= self.context:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt in the model's context "
                             f"(max_seq_len={self.context})")
        self.model, self.params, self.tokenizer, self.out = model, params, tokenizer, out
        self.sampler, self.max_new_tokens, self.settings = sampler, max_new_tokens, settings
        self.system = [{"role": "system", "content": system}] if system else []
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
        run = decoding.generate if self.sampler == "generate" else parallel_decoding.parallel_generate
        return run(self.model, self.params, pad_prompt(ids, self.context - self.max_new_tokens), lengths=[len(ids)],
                   max_new_tokens=self.max_new_tokens, stop_tokens=self.stops, stream=_stream, **self.settings)

    def reply(self, text: str, show_steps: bool = False) -> str | None:
        """Adds the user's message, streams the answer to `out` and returns it (None if the message was too long)."""
        global _printer
        self.messages.append({"role": "user", "content": text})
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m recurrent_depth.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="HF checkpoint directory, parameter checkpoint or workdir")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model or tokenizer.json (default: the "
                   "checkpoint's)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--sampler", choices=SAMPLERS, default="generate",
                   help="generate: token by token; parallel: the diffusion-style sampler")
    p.add_argument("--num_steps", type=int, default=None, help="core iterations per token (default: the model's "
                   "mean recurrence; with an exit criterion, the most)")
    p.add_argument("--exit_criterion", default=None, help="adaptive exit per token (generate): entropy-diff, "
                   "latent-diff, kl, minp-kl, argmax-stability, cosine")
    p.add_argument("--exit_threshold", type=float, default=None, help="exit threshold (parallel: the latent-diff "
                   "freezing threshold)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--min_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache_strategy", default=None, help="KV cache strategy (default: the sampler's)")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--show_steps", action="store_true", help="print the iterations each token used")
    return p.parse_args(argv)


def _settings(args: argparse.Namespace) -> dict:
    """The sampler's keyword arguments from the flags (unset ones left to the sampler's defaults)."""
    if args.sampler == "parallel" and args.exit_criterion:
        raise ValueError("--exit_criterion is for --sampler=generate; the parallel sampler freezes positions by "
                         "--exit_threshold (latent-diff)")
    names = ["num_steps", "exit_threshold", "temperature", "top_k", "top_p", "min_p", "seed", "cache_strategy"]
    if args.sampler == "generate":
        names.append("exit_criterion")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def load(args: argparse.Namespace):
    """(model, params, tokenizer) of the checkpoint; ValueError/FileNotFoundError for bad input."""
    from recurrent_depth.checkpoint import load_model
    from recurrent_depth.evaluation.runner import checkpoint_run_config, find_tokenizer
    from recurrent_depth.paths import as_path

    checkpoint = as_path(args.checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist")
    tokenizer = find_tokenizer(checkpoint, args.tokenizer, checkpoint_run_config(checkpoint, None))
    check_chat_template(tokenizer)  # before the (slow) model load
    model, params = load_model(checkpoint, dtype=args.dtype)
    return model, params, tokenizer


def main(argv=None, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    args = parse_args(argv)
    try:
        settings = _settings(args)
        model, params, tokenizer = load(args)
        session = ChatSession(model, params, tokenizer, system=args.system, sampler=args.sampler,
                              max_new_tokens=args.max_new_tokens, out=out, **settings)
    except (FileNotFoundError, ValueError) as err:  # bad input: a message, not a traceback
        print(f"chat: error: {err}", file=sys.stderr)
        return 2
    out.write(f"[{args.checkpoint}: {args.sampler} sampler; /reset starts over, /quit ends]\n")
    while True:
        out.write("> ")
        out.flush()
        line = stdin.readline()
        if not line or line.strip() == "/quit":  # end of input, or /quit
            out.write("\n" if not line else "")
            return 0
        text = line.strip()
        if text == "/reset":
            session.reset()
            session.notice("new conversation")
        elif text.startswith("/"):
            session.notice(f"unknown command {text.split()[0]}; commands: /reset, /quit")
        elif text:
            try:
                session.reply(text, show_steps=args.show_steps)
            except ValueError as err:  # settings the sampler rejects (checked before compiling)
                print(f"chat: error: {err}", file=sys.stderr)
                return 2


if __name__ == "__main__":
    sys.exit(main())
