"""Checkpoint conversion between the original's Hugging Face format, Orbax parameter checkpoints and train.py
workdirs (their newest checkpoint):

  python -m recurrent_depth.cli.convert to-params SRC OUT_DIR [--dtype=bfloat16]   # parameters alone, for inference
  python -m recurrent_depth.cli.convert to-hf SRC OUT_DIR [--max_shard_gb=5] [--dtype=float32]

SRC is a Hugging Face checkpoint directory, a parameter checkpoint or a train.py workdir.
"""

from __future__ import annotations

import sys

import jax
from absl import flags

from recurrent_depth.checkpoint.huggingface import to_huggingface
from recurrent_depth.checkpoint.loading import load_model
from recurrent_depth.checkpoint.params import save_params
from recurrent_depth.cli import app
from recurrent_depth.model.config import DTYPES

PROG = "python -m recurrent_depth.cli.convert"
COMMANDS = ("to-params", "to-hf")  # an Orbax parameter checkpoint; a Hugging Face directory (the original's format)
FLAGS = flags.FlagValues()
flags.DEFINE_enum("dtype", None, sorted(DTYPES), "cast the parameters", flag_values=FLAGS)
flags.DEFINE_float("max_shard_gb", 5.0, "to-hf: shard safetensors above this size", flag_values=FLAGS)
flags.register_validator("max_shard_gb", lambda gb: gb > 0, "--max_shard_gb must be positive", flag_values=FLAGS)


def main(argv: list[str] | None = None) -> int:
    return app.run(_convert, FLAGS, argv, doc=__doc__, prog=PROG)


def _convert(args: list[str]) -> int:
    command, src, dst = app.positional(args, "SRC", "OUT_DIR", commands=COMMANDS)
    if command == "to-params" and FLAGS["max_shard_gb"].present:
        raise app.UsageError("--max_shard_gb is for to-hf")
    model, params = load_model(src, dtype=FLAGS.dtype)  # CheckpointError is a ValueError: status 1
    if command == "to-params":
        save_params(dst, model.config, params)
    else:
        to_huggingface(model.config, params, dst, max_shard_bytes=int(FLAGS.max_shard_gb * 2**30))
    print(f"wrote {dst} ({sum(x.size for x in jax.tree.leaves(params)):,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
