"""Checkpoint conversion between the original's Hugging Face format, Orbax parameter checkpoints and train.py
workdirs (their newest checkpoint).

  python -m recurrent_depth.convert to-params SRC OUT_DIR [--dtype bfloat16]   # parameters alone, for inference
  python -m recurrent_depth.convert to-hf SRC OUT_DIR [--max-shard-gb 5] [--dtype float32]

SRC is a Hugging Face checkpoint directory, a parameter checkpoint or a train.py workdir.
"""

from __future__ import annotations

import argparse
import sys

import jax

from recurrent_depth.checkpoint.huggingface import to_huggingface
from recurrent_depth.checkpoint.loading import load_model
from recurrent_depth.checkpoint.params import save_params
from recurrent_depth.errors import CheckpointError
from recurrent_depth.model.config import DTYPES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recurrent_depth.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    to_params = sub.add_parser("to-params", help="write an Orbax parameter checkpoint")
    to_hf = sub.add_parser("to-hf", help="write a Hugging Face checkpoint directory (the original's format)")
    for p in (to_params, to_hf):
        p.add_argument("src")
        p.add_argument("dst")
        p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="cast the parameters")
    to_hf.add_argument("--max-shard-gb", type=float, default=5.0, help="shard safetensors above this size")
    args = parser.parse_args(argv)
    if args.command == "to-hf" and args.max_shard_gb <= 0:
        parser.error("--max-shard-gb must be positive")
    try:
        model, params = load_model(args.src, dtype=args.dtype)
        if args.command == "to-params":
            save_params(args.dst, model.config, params)
        else:
            to_huggingface(model.config, params, args.dst, max_shard_bytes=int(args.max_shard_gb * 2**30))
    except (FileNotFoundError, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst} ({sum(x.size for x in jax.tree.leaves(params)):,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
