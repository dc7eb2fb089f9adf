"""Pictures and a JSON of what the recurrence does on one prompt:

  python -m recurrent_depth.cli.inspect --checkpoint=huginn-0125 --prompt="The capital of France is" \\
      [--num_steps=32] [--num_inits=4] [--positions=2,-1] [--nobos] [--output=inspect_results]
  python -m recurrent_depth.cli.inspect --checkpoint=DIR --ids=1,8,500,12 ...

--checkpoint is a Hugging Face directory, a parameter checkpoint or a train.py workdir; exactly one of --prompt
and --ids gives the tokens.  The tokenizer comes from --tokenizer (a SentencePiece .model, a tokenizer.json, or
`shell_game` for the demo), else the checkpoint's tokenizer.json or its run config; --ids needs none (labels are
then ids).  Writes convergence.png (relative state change, tokens x iterations), top_tokens.png (the top next
token after each iteration), trajectories.png (PCA of the latent trajectories of the tokens at --positions from
--num_inits random initial states) and inspection.json.
"""

from __future__ import annotations

import functools
import sys

from absl import flags

from recurrent_depth.checkpoint.loading import checkpoint_run_config, find_tokenizer, load_model
from recurrent_depth.cli import app
from recurrent_depth.data.tokenizer import load_tokenizer
from recurrent_depth.inspect import report
from recurrent_depth.runtime.paths import as_path

PROG = "python -m recurrent_depth.cli.inspect"


class _IntListParser(flags.ListParser):
    """Comma-separated integers (empty items skipped)."""

    def parse(self, argument):
        items = super().parse(argument)
        try:
            return [int(x) for x in items if str(x).strip()]
        except ValueError:
            raise ValueError(f"expected comma-separated integers, got {argument!r}") from None

    def flag_type(self):
        return "comma separated list of integers"


FLAGS = flags.FlagValues()
flags.DEFINE_string("checkpoint", None, "HF directory, parameter checkpoint or train.py workdir", flag_values=FLAGS)
flags.DEFINE_string("prompt", None, "text, encoded with the tokenizer", flag_values=FLAGS)
flags.DEFINE(_IntListParser(), "ids", None, "comma-separated token ids, used as given (no tokenizer needed)",
             flag_values=FLAGS, serializer=flags.CsvListSerializer(","))
flags.DEFINE_string("tokenizer", None, "SentencePiece .model, tokenizer.json (or its directory) or shell_game",
                    flag_values=FLAGS)
flags.DEFINE_bool("bos", True, "prepend the tokenizer's BOS token to --prompt (default: yes; --nobos: no)",
                  flag_values=FLAGS)
flags.DEFINE_integer("num_steps", 32, "iterations of the core block (default 32)", flag_values=FLAGS)
flags.DEFINE_integer("num_inits", 4, "random initial states (default 4)", flag_values=FLAGS)
flags.DEFINE_float("init_scale", None, "scale of the random initial state (default: the model's; 0: one zero state)",
                   flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "seed of the initial states", flag_values=FLAGS)
flags.DEFINE(_IntListParser(), "positions", None, "positions whose trajectories are plotted (negative: from the "
             "end; default 4 spread)", flag_values=FLAGS, serializer=flags.CsvListSerializer(","))
flags.DEFINE_integer("top_k", 5, "top tokens kept per iteration in the JSON", flag_values=FLAGS)
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "parameter and compute dtype", flag_values=FLAGS)
flags.DEFINE_string("output", "inspect_results", "directory for the PNGs and inspection.json", flag_values=FLAGS)
flags.mark_flag_as_required("checkpoint", flag_values=FLAGS)
flags.mark_flags_as_mutual_exclusive(["prompt", "ids"], required=True, flag_values=FLAGS)


def _tokenizer(args: flags.FlagValues):
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


def run(args: flags.FlagValues) -> list:
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


def main(argv: list[str] | None = None) -> int:
    return app.run(_inspect, FLAGS, argv, doc=__doc__, prog=PROG)


def _inspect(args: list[str]) -> int:
    app.positional(args)
    paths = run(FLAGS)  # bad input raises (FileNotFoundError, ValueError): a message, not a traceback
    print("wrote", *paths, sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
