"""The shell game's chat variant as JSONL, for the fine-tuning demo (configs/sft_demo.py):

  python -m recurrent_depth.cli.shell_game chat-data --output shell_chat.jsonl [--size 20000] [--lengths 1-16]
"""

from __future__ import annotations

import argparse
import json
import sys

from recurrent_depth.data.shell_game import chat_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recurrent_depth.shell_game", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("chat-data", help="write the chat variant's conversations as JSONL")
    p.add_argument("--output", required=True, help="the JSONL file to write")
    p.add_argument("--size", type=int, default=20000, help="conversations")
    p.add_argument("--lengths", default="1-16", help="swaps per problem, MIN-MAX (cycled)")
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    lo, _, hi = args.lengths.partition("-")
    try:
        lengths = (int(lo), int(hi or lo))
    except ValueError:
        parser.error(f"--lengths must be MIN-MAX or one number, got {args.lengths!r}")
    if not 1 <= lengths[0] <= lengths[1] or args.size < 1:
        parser.error(f"need 1 <= MIN <= MAX and --size >= 1, got {args.lengths!r} and {args.size}")
    with open(args.output, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in chat_rows(args.size, args.seed, lengths))
    print(f"wrote {args.size} conversations with {lengths[0]}-{lengths[1]} swaps to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
