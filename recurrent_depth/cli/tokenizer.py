"""Training a SentencePiece tokenizer whose decode(encode(x)) == x:

  python -m recurrent_depth.cli.tokenizer train --input=a.txt,b.txt --model_prefix=tok --vocab_size=8000 \\
      [--model_type=unigram]

--input is comma-separated, each a text file or a glob pattern (quoted, so that the shell leaves it alone).
Writes tok.model.
"""

from __future__ import annotations

import glob
import sys

from absl import flags

from recurrent_depth.cli import app
from recurrent_depth.data.sources import expand_paths
from recurrent_depth.data.tokenizer import train_sentencepiece

PROG = "python -m recurrent_depth.cli.tokenizer"
FLAGS = flags.FlagValues()
flags.DEFINE_list("input", None, "text files or glob patterns, comma-separated", flag_values=FLAGS)
flags.DEFINE_string("model_prefix", None, "writes MODEL_PREFIX.model", flag_values=FLAGS)
flags.DEFINE_integer("vocab_size", None, "vocabulary size", flag_values=FLAGS)
flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "SentencePiece model type", flag_values=FLAGS)
flags.mark_flags_as_required(["input", "model_prefix", "vocab_size"], flag_values=FLAGS)


def main(argv: list[str] | None = None) -> int:
    return app.run(_tokenizer, FLAGS, argv, doc=__doc__, prog=PROG)


def _tokenizer(args: list[str]) -> int:
    app.positional(args, commands=("train",))
    inputs = [path for item in FLAGS.input for path in (expand_paths(item) if glob.has_magic(item) else [item])]
    try:
        tok = train_sentencepiece(inputs, FLAGS.model_prefix, FLAGS.vocab_size, FLAGS.model_type)
    except RuntimeError as err:  # SentencePiece's way of rejecting its input: bad input too
        raise ValueError(err) from err
    print(f"wrote {FLAGS.model_prefix}.model ({tok.vocab_size} pieces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
