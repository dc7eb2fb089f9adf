"""lm-evaluation-harness's command line with this project's model registered as `recurrent_depth`:

  python -m recurrent_depth.cli.lm_eval --model recurrent_depth \\
      --model_args checkpoint=huginn-0125,num_steps=32,dtype=bfloat16 --tasks arc_easy,hellaswag --batch_size 16

The flags are lm-eval's own argparse flags, passed through untouched (`--name value`, its own --help and exit
statuses): this is the one tool here that does not use absl flags (recurrent_depth.cli.app), since its command line
is lm-eval's.  See recurrent_depth.evaluation.lm_eval for the model args.
"""

from __future__ import annotations

import recurrent_depth.evaluation.lm_eval  # noqa: F401  (registers the model with lm-eval)


def main() -> None:
    """lm-eval's command line with `recurrent_depth` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
