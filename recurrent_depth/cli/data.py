"""Pre-tokenizing text/JSONL into ArrayRecord shards for `array_record` sources:

  python -m recurrent_depth.cli.data prepare --input='corpus/*.jsonl' --tokenizer=tok.model --output=shards/ \\
      [--shards=8] [--text_field=text]

--input is comma-separated, each a file or a glob pattern (quoted, so that the shell leaves it alone).
"""

from __future__ import annotations

import sys

from absl import flags

from recurrent_depth.cli import app
from recurrent_depth.data.prepare import prepare
from recurrent_depth.data.tokenizer import load_tokenizer

PROG = "python -m recurrent_depth.cli.data"
FLAGS = flags.FlagValues()
flags.DEFINE_list("input", None, "files or glob patterns, comma-separated", flag_values=FLAGS)
flags.DEFINE_string("tokenizer", None, "a SentencePiece .model or a tokenizer.json", flag_values=FLAGS)
flags.DEFINE_string("output", None, "directory for the shards", flag_values=FLAGS)
flags.DEFINE_integer("shards", 1, "number of shards", flag_values=FLAGS)
flags.DEFINE_string("text_field", "text", "the JSONL records' text field", flag_values=FLAGS)
flags.mark_flags_as_required(["input", "tokenizer", "output"], flag_values=FLAGS)


def main(argv: list[str] | None = None) -> int:
    return app.run(_data, FLAGS, argv, doc=__doc__, prog=PROG)


def _data(args: list[str]) -> int:
    app.positional(args, commands=("prepare",))
    kind = "huggingface" if FLAGS.tokenizer.endswith(".json") else "sentencepiece"
    paths = prepare(FLAGS.input, load_tokenizer(kind, FLAGS.tokenizer), FLAGS.output, FLAGS.shards,
                    text_field=FLAGS.text_field)
    print(f"wrote {len(paths)} shard(s) to {FLAGS.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
