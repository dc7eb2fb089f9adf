"""Train-step throughput and MFU at the "bench-small" shape; prints one JSON line.

  python bench/train_bench.py [--steps 5] [--peak-size 2048]

bench-small: hidden 512, 8 heads, (2, 4, 2) layers, MLP 1536, vocab 32768, batch 4 x 256 tokens, n = k = 4,
float32, one device.  MFU is against this machine's measured float32 matmul peak.  Memory: the compiled step's
temporary buffers for r = 8 and r = 32 at the same k (one compiled program serves every n, so they are equal)
and the process's peak resident memory after running each.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import jax

from recurrent_depth import flops
from recurrent_depth.config import base_config
from recurrent_depth.sharding import make_mesh
from recurrent_depth.synthetic import progression_batches
from recurrent_depth.training import Trainer


def bench_config(n: int, k: int):
    config = base_config()
    config.model.update(vocab_size=32768, hidden_size=512, num_heads=8, intermediate_size=1536,
                        num_prelude_layers=2, num_core_layers=4, num_coda_layers=2, max_seq_len=256,
                        mean_recurrence=n + k, mean_backprop_depth=k)
    config.train.update(batch_size=4, seq_len=256, steps=1000)
    config.train.depth.update(kind="fixed", n=n, k=k)
    return config


def run(n: int, k: int, steps: int):
    config = bench_config(n, k)
    trainer = Trainer(config, make_mesh((1, 1, 1), jax.devices()[:1]))
    state = trainer.init_state()
    batches = progression_batches(4, 256, config.model.vocab_size, seed=0)
    batch = next(batches)
    memory = trainer._step.lower(state, jax.device_put(batch, trainer.batch_sharding)).compile().memory_analysis()
    state, metrics = trainer.step(state, batch)  # compile + warm up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = trainer.step(state, next(batches))
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - start
    return trainer, steps * 4 * 256 / elapsed, memory, trainer.compilations


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--peak-size", type=int, default=2048, help="matmul size for the measured peak")
    args = parser.parse_args()
    peak = flops.measure_matmul_peak(args.peak_size)
    trainer, tokens_per_sec, memory, compiles = run(4, 4, args.steps)
    flop_per_token = flops.train_flops_per_token(trainer.model_config, 256, 4, 4)
    rss_r8 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    _, _, memory_r32, _ = run(28, 4, 1)
    rss_r32 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "bench": "train_step", "shape": "bench-small", "backend": jax.default_backend(),
        "tokens_per_sec": round(tokens_per_sec, 1),
        "model_tflops_per_sec": round(tokens_per_sec * flop_per_token / 1e12, 4),
        "matmul_peak_tflops": round(peak / 1e12, 4),
        "mfu": round(tokens_per_sec * flop_per_token / peak, 4),
        "compiles": compiles,
        "temp_bytes_r8": memory.temp_size_in_bytes if memory else None,
        "temp_bytes_r32": memory_r32.temp_size_in_bytes if memory_r32 else None,
        "peak_rss_bytes_after_r8": rss_r8, "peak_rss_bytes_after_r32": rss_r32,
    }))


if __name__ == "__main__":
    main()
