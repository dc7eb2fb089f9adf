"""`python -m recurrent_depth.inspect`: pictures and a JSON of what the recurrence does on one prompt.

  python -m recurrent_depth.inspect --checkpoint=huginn-0125 --prompt="The capital of France is" \\
      --num_steps=32 --num_inits=4 --output=inspect_results

CHECKPOINT is a Hugging Face directory, a parameter checkpoint or a train.py workdir.  The tokenizer comes from
--tokenizer (a SentencePiece .model, a tokenizer.json, or `shell_game` for the demo), else the checkpoint's
tokenizer.json or its run config; --ids needs none (labels are then ids).  Writes convergence.png (relative
state change, tokens x iterations), top_tokens.png (the top next token after each iteration), trajectories.png
(PCA of the latent trajectories of the tokens at --positions from --num_inits random initial states) and
inspection.json.
"""

from __future__ import annotations

import argparse
import functools
import sys

from recurrent_depth.checkpoint.loading import checkpoint_run_config, find_tokenizer, load_model
from recurrent_depth.data.tokenizer import load_tokenizer
from recurrent_depth.inspect import report
from recurrent_depth.runtime.paths import as_path

PROG = "python -m recurrent_depth.inspect"


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="HF directory, parameter checkpoint or train.py workdir")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="text, encoded with the tokenizer")
    source.add_argument("--ids", type=_int_list, help="comma-separated token ids, used as given (no tokenizer needed)")
    parser.add_argument("--tokenizer", help="SentencePiece .model, tokenizer.json (or its directory) or shell_game")
    parser.add_argument("--bos", action=argparse.BooleanOptionalAction, default=True,
                        help="prepend the tokenizer's BOS token to --prompt (default: yes)")
    parser.add_argument("--num_steps", type=int, default=32, help="iterations of the core block (default 32)")
    parser.add_argument("--num_inits", type=int, default=4, help="random initial states (default 4)")
    parser.add_argument("--init_scale", type=float, default=None,
                        help="scale of the random initial state (default: the model's; 0: one zero state)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial states")
    parser.add_argument("--positions", type=_int_list, default=None,
                        help="positions whose trajectories are plotted (negative: from the end; default 4 spread)")
    parser.add_argument("--top_k", type=int, default=5, help="top tokens kept per iteration in the JSON")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--output", default="inspect_results", help="directory for the PNGs and inspection.json")
    return parser.parse_args(argv)


def _tokenizer(args: argparse.Namespace):
    """The tokenizer, or None for --ids without one; a --prompt without one raises FileNotFoundError."""
    if args.tokenizer == "shell_game":
        return load_tokenizer("shell_game", "")
    checkpoint = as_path(args.checkpoint)
    try:
        return find_tokenizer(checkpoint, args.tokenizer, checkpoint_run_config(checkpoint, None))
    except FileNotFoundError:
        if args.prompt is not None or args.tokenizer:
            raise
        return None


def run(args: argparse.Namespace) -> list:
    """Loads, inspects and writes; returns the written paths."""
    if not as_path(args.checkpoint).exists():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist")
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt is empty")
    tokenizer = _tokenizer(args)
    if args.prompt is not None:
        token_ids, what = tokenizer.encode(args.prompt), "the prompt"
        if not token_ids:
            raise ValueError(f"the prompt {args.prompt!r} encodes to no tokens")
        token_ids = ([tokenizer.bos_id] if args.bos else []) + token_ids
    else:
        token_ids, what = args.ids, "--ids"
        if not token_ids:
            raise ValueError("--ids is empty: give comma-separated token ids")
    model, params = load_model(args.checkpoint, dtype=args.dtype)
    outside = [t for t in token_ids if not 0 <= t < model.config.vocab_size]
    if outside:
        raise ValueError(f"{what}: token id {outside[0]} is outside the model's vocabulary "
                         f"[0, {model.config.vocab_size})")
    if len(token_ids) > model.config.max_seq_len:
        raise ValueError(f"{what} is {len(token_ids)} tokens, longer than the model's context "
                         f"(max_seq_len={model.config.max_seq_len})")
    inspection = report.inspect_tokens(model, params, token_ids, num_steps=args.num_steps, num_inits=args.num_inits,
                                       init_scale=args.init_scale, seed=args.seed, positions=args.positions,
                                       top_k=args.top_k)
    header = {"checkpoint": str(args.checkpoint), "prompt": args.prompt}
    return report.write(args.output, inspection, functools.partial(report.token_text, tokenizer), header)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        paths = run(args)
    except (FileNotFoundError, ValueError) as err:  # bad input: a message, not a traceback
        sys.exit(f"{PROG}: error: {err}")
    print("wrote", *paths, sep="\n  ")
