"""Checkpoint conversion between the original's Hugging Face format and Orbax parameter checkpoints.

  python -m recurrent_depth.convert hf-to-orbax HF_DIR OUT_DIR [--dtype bfloat16]
  python -m recurrent_depth.convert orbax-to-hf ORBAX_DIR OUT_DIR [--max-shard-gb 5]
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from recurrent_depth.checkpoint import load_params, save_params
from recurrent_depth.config import DTYPES
from recurrent_depth.hf import CheckpointError, from_huggingface, to_huggingface


def _count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recurrent_depth.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    to_orbax = sub.add_parser("hf-to-orbax", help="Hugging Face checkpoint directory -> Orbax parameter checkpoint")
    to_orbax.add_argument("src")
    to_orbax.add_argument("dst")
    to_orbax.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    to_hf = sub.add_parser("orbax-to-hf", help="Orbax parameter checkpoint -> Hugging Face checkpoint directory")
    to_hf.add_argument("src")
    to_hf.add_argument("dst")
    to_hf.add_argument("--max-shard-gb", type=float, default=5.0, help="shard safetensors above this size")
    to_hf.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="cast parameters before writing")
    args = parser.parse_args(argv)
    try:
        if args.command == "hf-to-orbax":
            model, params = from_huggingface(args.src, dtype=args.dtype)
            save_params(args.dst, model.config, params)
        else:
            model, params = load_params(args.src)
            config = model.config
            if args.dtype is not None:
                params = jax.tree.map(lambda x: x.astype(jnp.dtype(args.dtype)), params)
                config = config.replace(dtype=args.dtype, param_dtype=args.dtype)
            if args.max_shard_gb <= 0:
                parser.error("--max-shard-gb must be positive")
            to_huggingface(config, params, args.dst, max_shard_bytes=int(args.max_shard_gb * 2**30))
    except (FileNotFoundError, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst} ({_count(params):,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
