"""Offline training corpora (recurrent_depth.data.corpus):

  python -m recurrent_depth.cli.corpus stdlib --output corpus/stdlib [--vocab-size 4096]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from recurrent_depth.data.corpus import DEFAULT_VOCAB_SIZE, prepare_stdlib


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recurrent_depth.corpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("stdlib", help="the Python standard library's source as JSONL, with a tokenizer")
    p.add_argument("--output", required=True, help="directory to write (local or gs://)")
    p.add_argument("--root", default=None, help="source directory (default: this interpreter's standard library)")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    p.add_argument("--valid-percent", type=float, default=2.0, help="share of files held out (by path hash)")
    p.add_argument("--max-files", type=int, default=None, help="use only this many files (evenly spaced)")
    args = parser.parse_args(argv)
    try:
        manifest = prepare_stdlib(args.output, root=args.root, vocab_size=args.vocab_size,
                                  valid_percent=args.valid_percent, max_files=args.max_files)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    train, valid = manifest["train"], manifest["valid"]
    print(f"wrote {args.output}: {train['files']} training files ({train['bytes'] / 1e6:.1f} MB), {valid['files']} "
          f"held out ({valid['bytes'] / 1e6:.2f} MB), tokenizer of {manifest['vocab_size']} pieces")
    return 0


if __name__ == "__main__":
    sys.exit(main())
