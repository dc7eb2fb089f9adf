"""Chat with a model in the terminal, tokens printed as they become final:

  python -m recurrent_depth.cli.chat --checkpoint=DIR [--num_steps=32] [--system="You are a helpful assistant."] \\
      [--sampler=parallel] [--temperature=0.7 --top_p=0.9] [--show_steps]

DIR (e.g. huginn-0125) is a Hugging Face checkpoint directory (its tokenizer.json is used), a parameter checkpoint
or a train.py workdir (the tokenizer its run config names), as for eval.py; its parameters load in the checkpoint's
own dtype (a Hugging Face config.json's torch_dtype: bfloat16 for huginn-0125) unless --dtype says otherwise.  The
conversation is rendered with the tokenizer's chat template (recurrent_depth.data.chat_template); the shell game's
SFT demo (configs/sft_demo.py, `--checkpoint=workdir-sft`) chats as its fine-tuning data were written, one question
(the swaps) per conversation, and a message outside its words gets a notice of what it understands.  When a
conversation no longer fits the model's context with room for a reply, the oldest turns are dropped (the system
prompt stays) with a notice.  Commands: /reset (a new conversation), /quit (or end of input).  Exit status: 0, 1 for
bad input (a one-line message), 2 for usage errors.
"""

from __future__ import annotations

import functools
import sys
from typing import TextIO

from absl import flags

from recurrent_depth.checkpoint.loading import checkpoint_run_config, find_tokenizer, load_model
from recurrent_depth.cli import app
from recurrent_depth.data.chat_template import chat_hint
from recurrent_depth.decoding.chat_session import MAX_NEW_TOKENS, SAMPLERS, ChatSession, check_chat_template
from recurrent_depth.runtime.paths import as_path

PROG = "python -m recurrent_depth.cli.chat"
FLAGS = flags.FlagValues()
flags.DEFINE_string("checkpoint", None, "HF checkpoint directory, parameter checkpoint or workdir", flag_values=FLAGS)
flags.DEFINE_string("tokenizer", None, "SentencePiece .model or tokenizer.json (default: the checkpoint's)",
                    flag_values=FLAGS)
flags.DEFINE_string("system", None, "system prompt", flag_values=FLAGS)
flags.DEFINE_enum("sampler", "generate", SAMPLERS, "generate: token by token; parallel: the diffusion-style sampler",
                  flag_values=FLAGS)
flags.DEFINE_integer("num_steps", None, "core iterations per token (default: the model's mean recurrence; with an "
                     "exit criterion, the most)", flag_values=FLAGS)
flags.DEFINE_string("exit_criterion", None, "adaptive exit per token (generate): entropy-diff, latent-diff, kl, "
                    "minp-kl, argmax-stability, cosine", flag_values=FLAGS)
flags.DEFINE_float("exit_threshold", None, "exit threshold (parallel: the latent-diff freezing threshold)",
                   flag_values=FLAGS)
flags.DEFINE_float("temperature", 0.0, "0: greedy", flag_values=FLAGS)
flags.DEFINE_integer("top_k", None, "sample from the k most likely tokens", flag_values=FLAGS)
flags.DEFINE_float("top_p", None, "nucleus sampling: the smallest set of tokens with this probability",
                   flag_values=FLAGS)
flags.DEFINE_float("min_p", None, "drop tokens below this fraction of the top token's probability",
                   flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=FLAGS)
flags.DEFINE_string("cache_strategy", None, "KV cache strategy (default: the sampler's)", flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", None, f"most tokens per reply (default: {MAX_NEW_TOKENS}, at most half the "
                     "model's context)", flag_values=FLAGS)
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "parameter and compute dtype (default: the "
                  "checkpoint's own; a Hugging Face config.json's torch_dtype, bfloat16 for huginn-0125)",
                  flag_values=FLAGS)
flags.DEFINE_bool("show_steps", False, "print the iterations each token used", flag_values=FLAGS)
flags.mark_flag_as_required("checkpoint", flag_values=FLAGS)


def _settings(args: flags.FlagValues) -> dict:
    """The sampler's keyword arguments from the flags (unset ones left to the sampler's defaults)."""
    if args.sampler == "parallel" and args.exit_criterion:
        raise ValueError("--exit_criterion is for --sampler=generate; the parallel sampler freezes positions by "
                         "--exit_threshold (latent-diff)")
    names = ["num_steps", "exit_threshold", "temperature", "top_k", "top_p", "min_p", "seed", "cache_strategy"]
    if args.sampler == "generate":
        names.append("exit_criterion")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def load(args: flags.FlagValues):
    """(model, params, tokenizer) of the checkpoint; ValueError/FileNotFoundError for bad input."""
    checkpoint = as_path(args.checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist")
    tokenizer = find_tokenizer(checkpoint, args.tokenizer, checkpoint_run_config(checkpoint, None))
    check_chat_template(tokenizer)  # before the (slow) model load
    model, params = load_model(checkpoint, dtype=args.dtype)
    return model, params, tokenizer


def main(argv: list[str] | None = None, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    """The chat on `stdin` (default: sys.stdin) and `out` (default: sys.stdout); 0, 1 (bad input) or 2 (usage)."""
    return app.run(functools.partial(_chat, stdin=sys.stdin if stdin is None else stdin,
                                     out=sys.stdout if out is None else out), FLAGS, argv,
                   doc=__doc__, prog=PROG)


def _chat(args: list[str], stdin: TextIO, out: TextIO) -> int:
    app.positional(args)
    settings = _settings(FLAGS)  # bad input raises (ValueError, FileNotFoundError): a message, not a traceback
    model, params, tokenizer = load(FLAGS)
    session = ChatSession(model, params, tokenizer, system=FLAGS.system, sampler=FLAGS.sampler,
                          max_new_tokens=FLAGS.max_new_tokens, out=out, **settings)
    out.write(f"[{FLAGS.checkpoint}: {FLAGS.sampler} sampler; /reset starts over, /quit ends]\n")
    about = [chat_hint(tokenizer) or "", "each message is a new conversation" if session.single_turn else ""]
    if any(about):  # a task's model (the shell game's): what to type
        session.notice("; ".join(a for a in about if a))
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
        elif text:  # settings the sampler rejects raise ValueError here (checked before compiling)
            session.reply(text, show_steps=FLAGS.show_steps)


if __name__ == "__main__":
    sys.exit(main())
