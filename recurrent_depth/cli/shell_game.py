"""The shell game's chat variant as JSONL, for the fine-tuning demo (configs/sft_demo.py):

  python -m recurrent_depth.cli.shell_game chat-data --output=shell_chat.jsonl [--size=20000] [--lengths=1-16] \\
      [--seed=0]
"""

from __future__ import annotations

import json
import sys

from absl import flags

from recurrent_depth.cli import app
from recurrent_depth.data.shell_game import chat_rows

PROG = "python -m recurrent_depth.cli.shell_game"
FLAGS = flags.FlagValues()
flags.DEFINE_string("output", None, "the JSONL file to write", flag_values=FLAGS)
flags.DEFINE_integer("size", 20000, "conversations", flag_values=FLAGS)
flags.DEFINE_string("lengths", "1-16", "swaps per problem, MIN-MAX (cycled)", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "seed of the problems", flag_values=FLAGS)
flags.mark_flag_as_required("output", flag_values=FLAGS)


def main(argv: list[str] | None = None) -> int:
    return app.run(_chat_data, FLAGS, argv, doc=__doc__, prog=PROG)


def _chat_data(args: list[str]) -> int:
    app.positional(args, commands=("chat-data",))
    lo, _, hi = FLAGS.lengths.partition("-")
    try:
        lengths = (int(lo), int(hi or lo))
    except ValueError:
        raise app.UsageError(f"--lengths must be MIN-MAX or one number, got {FLAGS.lengths!r}") from None
    if not 1 <= lengths[0] <= lengths[1] or FLAGS.size < 1:
        raise app.UsageError(f"need 1 <= MIN <= MAX and --size >= 1, got {FLAGS.lengths!r} and {FLAGS.size}")
    with open(FLAGS.output, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in chat_rows(FLAGS.size, FLAGS.seed, lengths))
    print(f"wrote {FLAGS.size} conversations with {lengths[0]}-{lengths[1]} swaps to {FLAGS.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
