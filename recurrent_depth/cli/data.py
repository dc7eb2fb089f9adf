"""Pre-tokenizing text/JSONL into ArrayRecord shards for `array_record` sources:

  python -m recurrent_depth.cli.data prepare --input corpus/*.jsonl --tokenizer tok.model --output shards/ [--shards 8]
"""

from __future__ import annotations

import argparse
import sys

from recurrent_depth.data.prepare import prepare
from recurrent_depth.data.tokenizer import load_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recurrent_depth.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize text/JSONL into ArrayRecord shards")
    p.add_argument("--input", nargs="+", required=True, help="files or glob patterns")
    p.add_argument("--tokenizer", required=True, help="a SentencePiece .model or a tokenizer.json")
    p.add_argument("--output", required=True)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--text-field", default="text")
    args = parser.parse_args(argv)
    try:
        kind = "huggingface" if args.tokenizer.endswith(".json") else "sentencepiece"
        paths = prepare(args.input, load_tokenizer(kind, args.tokenizer), args.output, args.shards,
                        text_field=args.text_field)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {len(paths)} shard(s) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
