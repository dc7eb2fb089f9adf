"""Fit table of the released 3.5B shape's train step on TPU slices, compiled ahead of time on this machine.

  python bench/aot_tpu.py [--seq_len=4096] [--only=v5p] [--remat=nothing] [--attention=splash] \\
      [--moment_dtype=float32]
  python bench/aot_tpu.py --generate [--only=v5e]     # generation instead: bf16 weights, full vs compress-4 cache

For each TPU generation, slices from small to large: the train step (bf16 compute, float32 master weights,
splash attention, per-iteration remat, one sequence of 4096 tokens per data-parallel shard) is compiled for the
slice and its memory per chip compared with the chip's HBM.  One JSON line per compile; the first slice of each
generation that fits is marked `smallest_fit`.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from recurrent_depth.cli import app  # noqa: E402
from recurrent_depth.cli.aot import compile_generate, compile_train_step  # noqa: E402
from recurrent_depth.runtime.config_file import load_config_file  # noqa: E402

# (topology, mesh (data, fsdp, tensor)): FSDP over all chips; the 55 heads allow tensor parallelism of 5 or 11.
CANDIDATES = {
    "v5p": [("v5p:2x2x1", (1, 4, 1)), ("v5p:2x2x2", (1, 8, 1)), ("v5p:2x2x4", (1, 16, 1))],
    "v6e": [("v6e:2x2", (1, 4, 1)), ("v6e:2x4", (1, 8, 1)), ("v6e:4x4", (1, 16, 1))],
    "v5e": [("v5e:2x2", (1, 4, 1)), ("v5e:2x4", (1, 8, 1)), ("v5e:4x4", (1, 16, 1)), ("v5e:4x8", (1, 32, 1))],
}


FLAGS = flags.FlagValues()
flags.DEFINE_integer("seq_len", 4096, "train: tokens per sequence", flag_values=FLAGS)
flags.DEFINE_enum("only", None, sorted(CANDIDATES), "only this TPU generation", flag_values=FLAGS)
flags.DEFINE_string("remat", "nothing", "train: the model's remat_policy", flag_values=FLAGS)
flags.DEFINE_string("attention", "splash", "train: the model's attention_impl", flag_values=FLAGS)
flags.DEFINE_string("moment_dtype", "float32", "train: the optimizer's moment dtype", flag_values=FLAGS)
flags.DEFINE_bool("generate", False, "compile generation on each generation's first slice: batch 16, 1024-token "
                  "prompts, 256 new tokens, r = 32, full and compress-4 caches", flag_values=FLAGS)


def main(argv: list[str] | None = None) -> int:
    return app.run(_bench, FLAGS, argv, doc=__doc__, prog="bench/aot_tpu.py")


def _bench(positional: list[str]) -> None:
    app.positional(positional)
    config_file = os.path.join(os.path.dirname(__file__), "..", "configs", "huginn_3p5b.py")
    for generation, candidates in CANDIDATES.items():
        if FLAGS.only and generation != FLAGS.only:
            continue
        if FLAGS.generate:
            topology, mesh = candidates[0]
            for cache in ("full", "compress-4"):
                config = load_config_file(config_file)
                config.model.update(dtype="bfloat16", param_dtype="bfloat16")
                print(json.dumps(compile_generate(config, topology, mesh, batch_size=16, prompt_len=1024,
                                                  max_new_tokens=256, num_steps=32, cache_strategy=cache)),
                      flush=True)
            continue
        found = False
        for topology, mesh in candidates:
            config = load_config_file(config_file)
            chips = mesh[0] * mesh[1]
            config.train.update(batch_size=chips, seq_len=FLAGS.seq_len)
            config.model.update(remat_policy=FLAGS.remat, attention_impl=FLAGS.attention)
            config.train.optimizer.moment_dtype = FLAGS.moment_dtype
            result = compile_train_step(config, topology, mesh)
            result["smallest_fit"] = bool(result["fits"]) and not found
            found = found or bool(result["fits"])
            print(json.dumps(result), flush=True)
            if found:
                break


if __name__ == "__main__":
    sys.exit(main())
