"""The training program behind `train.py`: distributed start-up, the step loop, metrics and progress."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import ml_collections
from tqdm import tqdm

from recurrent_depth import flops, synthetic
from recurrent_depth.sharding import make_mesh
from recurrent_depth.training import Trainer, TrainState

def initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """Starts jax.distributed when several processes are configured (config, JAX_* env vars, or a TPU pod)."""
    address = config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        num = config.num_processes if config.num_processes is not None else int(os.environ["JAX_NUM_PROCESSES"])
        pid = config.process_id if config.process_id is not None else int(os.environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(address, num_processes=num, process_id=pid)
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # multi-host TPU slice: everything is auto-detected
        jax.distributed.initialize()


class MetricsWriter:
    """Appends one JSON object per logged step to <workdir>/metrics.jsonl (process 0 only)."""

    def __init__(self, workdir: str | os.PathLike):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            Path(workdir).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(workdir) / "metrics.jsonl", "a")

    def write(self, record: dict) -> None:
        if self.enabled:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()


def local_batches(config: ml_collections.ConfigDict, start_step: int) -> Iterator[dict]:
    """This process's rows of each global batch (the data issue adds real sources; synthetic is built in)."""
    if config.data.kind != "synthetic":
        raise ValueError(f"unknown data.kind {config.data.kind!r}; available: 'synthetic'")
    t = config.train
    rows = t.batch_size // jax.process_count()
    lo = jax.process_index() * rows
    for batch in synthetic.progression_batches(t.batch_size, t.seq_len, config.model.vocab_size, config.seed,
                                               start_step=start_step):
        yield {k: v[lo:lo + rows] for k, v in batch.items()}


def summarize(window: list[dict], trainer: Trainer, elapsed: float, peak_flops: float) -> dict:
    """Metrics of the last step plus throughput and MFU over the window of steps since the last log."""
    t = trainer.config.train
    last = window[-1]
    tokens = t.batch_size * t.seq_len
    step_flops = sum(flops.train_flops_per_token(trainer.model_config, t.seq_len, int(m["num_steps_no_grad"]),
                                                 int(m["num_steps_with_grad"])) * tokens for m in window)
    return {
        "loss": float(last["loss"]),
        "grad_norm": float(last["grad_norm"]),
        "lr": float(last["lr"]),
        "num_steps_no_grad": int(last["num_steps_no_grad"]),
        "num_steps_with_grad": int(last["num_steps_with_grad"]),
        "tokens_per_sec": len(window) * tokens / elapsed,
        "mfu": step_flops / elapsed / (peak_flops * jax.device_count()),
        "skipped_updates": int(last["skipped_updates"]),
    }


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> TrainState:
    """Trains for config.train.steps steps, logging to <workdir>/metrics.jsonl; returns the final state."""
    initialize_distributed(config.distributed)
    trainer = Trainer(config, make_mesh(config.mesh.shape))
    state = trainer.init_state()
    peak = config.train.peak_flops or flops.measure_matmul_peak()
    writer = MetricsWriter(workdir)
    start = int(state.step)
    steps = config.train.steps
    batches = local_batches(config, start)
    window, tick = [], time.perf_counter()
    progress = tqdm(total=steps, initial=start, disable=jax.process_index() != 0, desc="train")
    try:
        for step in range(start, steps):
            state, metrics = trainer.step(state, next(batches))
            window.append(metrics)
            if (step + 1) % config.train.log_every == 0 or step + 1 == steps:
                window = jax.device_get(window)
                if not config.train.skip_nonfinite and any(bool(m["nonfinite"]) for m in window):
                    raise FloatingPointError(f"non-finite gradient by step {step + 1} "
                                             "(set train.skip_nonfinite=True to skip such updates)")
                record = {"step": step + 1, **summarize(window, trainer, time.perf_counter() - tick, peak)}
                writer.write(record)
                progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_sec']:.0f}")
                window, tick = [], time.perf_counter()
            progress.update(1)
    finally:
        progress.close()
        writer.close()
    return state

