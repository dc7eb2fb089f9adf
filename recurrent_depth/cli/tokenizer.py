"""Training a SentencePiece tokenizer whose decode(encode(x)) == x:

  python -m recurrent_depth.cli.tokenizer train --input a.txt b.txt --model-prefix tok --vocab-size 8000
"""

from __future__ import annotations

import argparse
import sys

from recurrent_depth.data.tokenizer import train_sentencepiece


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recurrent_depth.tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a SentencePiece model from text files")
    train.add_argument("--input", nargs="+", required=True)
    train.add_argument("--model-prefix", required=True)
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    args = parser.parse_args(argv)
    try:
        tok = train_sentencepiece(args.input, args.model_prefix, args.vocab_size, args.model_type)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.model_prefix}.model ({tok.vocab_size} pieces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
