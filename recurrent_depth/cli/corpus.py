"""Offline training corpora (recurrent_depth.data.corpus):

  python -m recurrent_depth.cli.corpus stdlib --output=corpus/stdlib [--vocab_size=4096] [--valid_percent=2] \\
      [--max_files=N] [--root=DIR]

stdlib: the Python standard library's source as JSONL, with a tokenizer.
"""

from __future__ import annotations

import sys

from absl import flags

from recurrent_depth.cli import app
from recurrent_depth.data.corpus import DEFAULT_VOCAB_SIZE, prepare_stdlib

PROG = "python -m recurrent_depth.cli.corpus"
FLAGS = flags.FlagValues()
flags.DEFINE_string("output", None, "directory to write (local or gs://)", flag_values=FLAGS)
flags.DEFINE_string("root", None, "source directory (default: this interpreter's standard library)",
                    flag_values=FLAGS)
flags.DEFINE_integer("vocab_size", DEFAULT_VOCAB_SIZE, "tokenizer vocabulary size", flag_values=FLAGS)
flags.DEFINE_float("valid_percent", 2.0, "share of files held out (by path hash)", flag_values=FLAGS)
flags.DEFINE_integer("max_files", None, "use only this many files (evenly spaced)", flag_values=FLAGS)
flags.mark_flag_as_required("output", flag_values=FLAGS)


def main(argv: list[str] | None = None) -> int:
    return app.run(_corpus, FLAGS, argv, doc=__doc__, prog=PROG)


def _corpus(args: list[str]) -> int:
    app.positional(args, commands=("stdlib",))
    try:
        manifest = prepare_stdlib(FLAGS.output, root=FLAGS.root, vocab_size=FLAGS.vocab_size,
                                  valid_percent=FLAGS.valid_percent, max_files=FLAGS.max_files)
    except RuntimeError as err:  # SentencePiece's way of rejecting its input: bad input too
        raise ValueError(err) from err
    train, valid = manifest["train"], manifest["valid"]
    print(f"wrote {FLAGS.output}: {train['files']} training files ({train['bytes'] / 1e6:.1f} MB), {valid['files']} "
          f"held out ({valid['bytes'] / 1e6:.2f} MB), tokenizer of {manifest['vocab_size']} pieces")
    return 0


if __name__ == "__main__":
    sys.exit(main())
