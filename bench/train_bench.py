"""Train-step throughput, MFU and HFU at the "bench-small" shape; prints one JSON line.

  python bench/train_bench.py [--steps=5] [--peak_size=2048] [--profile=DIR]

bench-small: hidden 512, 8 heads, (2, 4, 2) layers, MLP 1536, vocab 32768, batch 4 x 256 tokens, n = k = 4,
float32, one device.  Three settings:
  original_work   the work of the original's bench (bench/original_train_bench.py): AdamW, no rematerialisation;
  original_flops  the same matmul FLOPs, nothing repeated, but only the matmul outputs kept for the backward pass
                  (remat_policy=matmuls): the elementwise ops are recomputed, which on CPU is faster than
                  storing and re-reading their outputs;
  defaults        the project's defaults: ELLIS-Adam, per-iteration rematerialisation (remat_policy=nothing).
MFU counts model FLOPs, HFU hardware FLOPs (also the recomputed forward), both against this machine's measured
float32 matmul peak (recurrent_depth.model.flops).  Memory: the compiled step's temporary buffers for r = 8 and
r = 32 at the same k (one compiled program serves every n, so they are equal) and the process's peak resident memory.
`--profile=DIR` writes a jax.profiler trace of the timed steps of each setting, and the compiled step's HLO, to
DIR/<setting>; `python bench/profile_summary.py DIR/<setting>` then says where the time went.  It runs with glibc's
transparent huge pages, as train.py does (recurrent_depth/runtime/host_memory.py;
GLIBC_TUNABLES=glibc.malloc.hugetlb=0 measures without).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import resource
import sys
import time

import jax
from absl import flags

from recurrent_depth.cli import app
from recurrent_depth.data.synthetic import progression_batches
from recurrent_depth.model import flops
from recurrent_depth.runtime.host_memory import use_huge_pages
from recurrent_depth.runtime.sharding import make_mesh
from recurrent_depth.training.config import base_config
from recurrent_depth.training.step import Trainer

BATCH, SEQ = 4, 256
FLAGS = flags.FlagValues()
flags.DEFINE_integer("steps", 5, "timed steps per setting, after one warm-up step", flag_values=FLAGS)
flags.DEFINE_integer("peak_size", 2048, "matmul size for the measured peak", flag_values=FLAGS)
flags.DEFINE_string("profile", None, "directory for jax.profiler traces of the timed steps", flag_values=FLAGS)
SETTINGS = {
    "original_work": {"optimizer": "adamw", "remat_policy": "everything"},
    "original_flops": {"optimizer": "adamw", "remat_policy": "matmuls"},
    "defaults": {"optimizer": "ellis_adam", "remat_policy": "nothing"},
}


def bench_config(n: int, k: int, optimizer: str, remat_policy: str):
    config = base_config()
    config.model.update(vocab_size=32768, hidden_size=512, num_heads=8, intermediate_size=1536,
                        num_prelude_layers=2, num_core_layers=4, num_coda_layers=2, max_seq_len=SEQ,
                        mean_recurrence=n + k, mean_backprop_depth=k, remat_policy=remat_policy)
    config.train.update(batch_size=BATCH, seq_len=SEQ, steps=1000)
    config.train.depth.update(kind="fixed", n=n, k=k)
    config.train.optimizer.name = optimizer
    return config


def run(config, steps: int, profile_dir: str | None = None):
    """(trainer, tokens/s over `steps` timed steps after one warm-up, compiled memory analysis, compilations)."""
    trainer = Trainer(config, make_mesh((1, 1, 1), jax.devices()[:1]))
    state = trainer.init_state()
    batches = progression_batches(BATCH, SEQ, config.model.vocab_size, seed=0)
    state, metrics = trainer.step(state, next(batches))  # compile + warm up
    jax.block_until_ready(metrics)
    trace = jax.profiler.trace(profile_dir) if profile_dir else contextlib.nullcontext()
    with trace:
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = trainer.step(state, next(batches))
        jax.block_until_ready(metrics)
        elapsed = time.perf_counter() - start
    compiles = trainer.compilations  # before lowering once more for the memory analysis
    compiled = trainer.lower().compile()
    if profile_dir:  # the compiled step, whose instruction names the trace's events carry (profile_summary.py)
        pathlib.Path(profile_dir, "step.hlo.txt").write_text(compiled.as_text())
    memory = compiled.memory_analysis()
    return trainer, steps * BATCH * SEQ / elapsed, memory, compiles


def main(argv: list[str] | None = None) -> int:
    return app.run(_bench, FLAGS, argv, doc=__doc__, prog="bench/train_bench.py")


def _bench(positional: list[str]) -> None:
    app.positional(positional)
    peak = flops.measure_matmul_peak(FLAGS.peak_size)
    out = {"bench": "train_step", "shape": "bench-small", "backend": jax.default_backend(), "n": 4, "k": 4,
           "matmul_peak_tflops": round(peak / 1e12, 4), "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}
    for name, setting in SETTINGS.items():
        profile = f"{FLAGS.profile}/{name}" if FLAGS.profile else None
        trainer, tokens_per_sec, memory, compiles = run(bench_config(4, 4, **setting), FLAGS.steps, profile)
        cfg = trainer.model_config
        model, hardware = flops.train_flops_per_token(cfg, SEQ, 4, 4), flops.hardware_train_flops_per_token(cfg, SEQ, 4)
        out[name] = {**setting, "tokens_per_sec": round(tokens_per_sec, 1),
                     "mfu": round(tokens_per_sec * model / peak, 4), "hfu": round(tokens_per_sec * hardware / peak, 4),
                     "compiles": compiles,
                     "temp_bytes_r8": memory.temp_size_in_bytes if memory else None}
    _, _, memory_r32, _ = run(bench_config(28, 4, **SETTINGS["defaults"]), 1)
    out["defaults"]["temp_bytes_r32"] = memory_r32.temp_size_in_bytes if memory_r32 else None
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(out))


if __name__ == "__main__":
    use_huge_pages()
    sys.exit(main())
