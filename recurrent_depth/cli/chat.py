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

from recurrent_depth.checkpoint.loading import checkpoint_run_config, find_tokenizer, load_model
from recurrent_depth.decoding.chat import SAMPLERS, ChatSession, check_chat_template
from recurrent_depth.runtime.paths import as_path


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
