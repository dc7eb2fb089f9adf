"""Fit table of the released 3.5B shape's train step on TPU slices, compiled ahead of time on this machine.

  python bench/aot_tpu.py [--seq-len 4096] [--only v5p]
  python bench/aot_tpu.py --generate [--only v5e]     # generation instead: bf16 weights, full vs compress-4 cache

For each TPU generation, slices from small to large: the train step (bf16 compute, float32 master weights,
splash attention, per-iteration remat, one sequence of 4096 tokens per data-parallel shard) is compiled for the
slice and its memory per chip compared with the chip's HBM.  One JSON line per compile; the first slice of each
generation that fits is marked `smallest_fit`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from recurrent_depth.cli.aot import compile_generate, compile_train_step  # noqa: E402
from recurrent_depth.runtime.config_file import load_config_file  # noqa: E402

# (topology, mesh (data, fsdp, tensor)): FSDP over all chips; the 55 heads allow tensor parallelism of 5 or 11.
CANDIDATES = {
    "v5p": [("v5p:2x2x1", (1, 4, 1)), ("v5p:2x2x2", (1, 8, 1)), ("v5p:2x2x4", (1, 16, 1))],
    "v6e": [("v6e:2x2", (1, 4, 1)), ("v6e:2x4", (1, 8, 1)), ("v6e:4x4", (1, 16, 1))],
    "v5e": [("v5e:2x2", (1, 4, 1)), ("v5e:2x4", (1, 8, 1)), ("v5e:4x4", (1, 16, 1)), ("v5e:4x8", (1, 32, 1))],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--only", choices=sorted(CANDIDATES), default=None)
    parser.add_argument("--remat", default="nothing")
    parser.add_argument("--attention", default="splash")
    parser.add_argument("--moment-dtype", default="float32")
    parser.add_argument("--generate", action="store_true", help="compile generation on each generation's first "
                        "slice: batch 16, 1024-token prompts, 256 new tokens, r = 32, full and compress-4 caches")
    args = parser.parse_args()
    config_file = os.path.join(os.path.dirname(__file__), "..", "configs", "huginn_3p5b.py")
    for generation, candidates in CANDIDATES.items():
        if args.only and generation != args.only:
            continue
        if args.generate:
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
            config.train.update(batch_size=chips, seq_len=args.seq_len)
            config.model.update(remat_policy=args.remat, attention_impl=args.attention)
            config.train.optimizer.moment_dtype = args.moment_dtype
            result = compile_train_step(config, topology, mesh)
            result["smallest_fit"] = bool(result["fits"]) and not found
            found = found or bool(result["fits"])
            print(json.dumps(result), flush=True)
            if found:
                break


if __name__ == "__main__":
    main()
