"""The training program behind `train.py`: distributed start-up, data, resume, the step loop, checkpoints,
held-out evaluation at several recurrence counts, metrics and progress."""

from __future__ import annotations

import os
import signal
import threading
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import multihost_utils
from tqdm import tqdm

from recurrent_depth.checkpoint.train_state import CHECKPOINTS_DIR, RUN_CONFIG_FILE, TrainCheckpointer
from recurrent_depth.data.pipeline import make_dataset
from recurrent_depth.errors import ConfigError
from recurrent_depth.model import flops
from recurrent_depth.runtime.distributed import initialize_distributed
from recurrent_depth.runtime.paths import as_path
from recurrent_depth.runtime.sharding import make_mesh
from recurrent_depth.training import telemetry
from recurrent_depth.training.losses import token_losses
from recurrent_depth.training.step import Trainer, TrainState, check_init_from
from recurrent_depth.training.validation import validate_run_config

PREFETCH_BATCHES = 2  # batches the host prepares ahead of the device


def summarize(window: list[dict], trainer: Trainer, elapsed: float, peak_flops: float) -> dict:
    """Metrics of the last step plus throughput, MFU and HFU (model and hardware FLOPs, see `flops`) over the window
    of steps since the last log."""
    t = trainer.config.train
    last = window[-1]
    tokens, cfg = t.batch_size * t.seq_len, trainer.model_config
    model_flops = hardware_flops = 0.0
    for m in window:
        n, k = int(m["num_steps_no_grad"]), int(m["num_steps_with_grad"])
        model_flops += flops.train_flops_per_token(cfg, t.seq_len, n, k) * tokens
        hardware_flops += flops.hardware_train_flops_per_token(cfg, t.seq_len, n) * tokens
    peak = peak_flops * jax.device_count() * elapsed
    return {
        "loss": float(last["loss"]),
        "grad_norm": float(last["grad_norm"]),
        "lr": float(last["lr"]),
        "num_steps_no_grad": int(last["num_steps_no_grad"]),
        "num_steps_with_grad": int(last["num_steps_with_grad"]),
        "tokens_per_sec": len(window) * tokens / elapsed,
        "mfu": model_flops / peak,
        "hfu": hardware_flops / peak,
        "skipped_updates": int(last["skipped_updates"]),
    }


class HeldOutEval:
    """Mean held-out loss at each of `num_steps` recurrences; one compilation serves every count."""

    def __init__(self, trainer: Trainer, batches: list[dict], num_steps):
        self.trainer, self.batches, self.num_steps = trainer, batches, tuple(num_steps)
        model = trainer.model

        def loss_sums(params, batch, r):
            out = model.apply({"params": params}, batch["inputs"], num_steps=r, segment_ids=batch.get("segment_ids"),
                              positions=batch.get("positions"), rngs={"state": jax.random.key(0)})
            _, ce, count = token_losses(out.logits, batch["labels"], 0.0)
            return ce, count

        self._loss_sums = jax.jit(loss_sums)

    def __call__(self, params) -> dict:
        results = {}
        with self.trainer.context():
            for r in self.num_steps:
                sums = [self._loss_sums(params, self.trainer.global_batch(b), jnp.int32(r)) for b in self.batches]
                ce, count = (sum(float(s[i]) for s in sums) for i in (0, 1))
                results[f"eval_loss_r{r}"] = ce / max(count, 1)
        return results


class _Preemption:
    """Whether to save and stop at a step because of a preemption notice (SIGTERM), agreed by all processes.

    Under jax.distributed, JAX's preemption service takes the signal: any process's notice makes
    `reached_preemption_sync_point(step)` true on every process at the same step, a host-side check without a device
    sync.  On one process the signal sets a flag.  On several processes without the service
    (jax_enable_preemption_service=False) the flags are all-gathered at log steps only, which are device syncs anyway.
    """

    def __init__(self, step: int):
        self.requested, self.service, self._installed, self._previous = False, False, False, None
        if jax.distributed.is_initialized():
            try:
                multihost_utils.reached_preemption_sync_point(step)  # raises if the service is off
                self.service = True
            except RuntimeError:
                pass
        if not self.service and threading.current_thread() is threading.main_thread():
            self._previous, self._installed = signal.signal(signal.SIGTERM, self._handle), True

    def _handle(self, signum, frame):
        self.requested = True

    def reached(self, step: int, log_step: bool) -> bool:
        """Whether every process stops after `step` (call it at every step, in order)."""
        if self.service:
            return multihost_utils.reached_preemption_sync_point(step)
        if jax.process_count() == 1:
            return self.requested
        return log_step and bool(multihost_utils.process_allgather(jnp.asarray(self.requested)).any())

    def close(self) -> None:
        """Gives SIGTERM back to the handler it had before."""
        if self._installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False


def _dataset(config, trainer: Trainer, seed: int, sources=None):
    return make_dataset(config.data, batch_size=config.train.batch_size, seq_len=config.train.seq_len,
                        vocab_size=trainer.model_config.vocab_size, seed=seed, rows=trainer.batch_rows,
                        sources=sources)


def _held_out(config, trainer: Trainer) -> HeldOutEval | None:
    if not config.eval.every:
        return None
    if config.data.kind in ("synthetic", "shell_game"):
        dataset = _dataset(config, trainer, seed=config.seed + 1)  # another seed: problems not trained on
    elif config.data.eval_sources:
        dataset = _dataset(config, trainer, seed=config.seed, sources=config.data.eval_sources)
    else:
        raise ValueError(f"eval.every > 0 needs data.eval_sources (held-out data) for data.kind={config.data.kind!r}")
    iterator = iter(dataset)
    return HeldOutEval(trainer, [next(iterator) for _ in range(config.eval.batches)], config.eval.num_steps)


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> TrainState:
    """Trains to config.train.steps, resuming from the newest checkpoint in `workdir`; returns the final state."""
    initialize_distributed(config.distributed)
    # Before any data, mesh or compilation: the config, and train.init_from unless the run resumes (then unused).
    model_config = validate_run_config(config, jax.device_count())
    workdir = as_path(workdir)
    profiler = telemetry.StepProfiler(config.train.profile_steps, workdir / telemetry.PROFILE_DIR)  # checks it
    ckpt = config.checkpoint
    checkpointer = TrainCheckpointer(workdir / CHECKPOINTS_DIR, ckpt.every, ckpt.keep, ckpt.keep_every, ckpt.async_save)
    if not checkpointer.manager.all_steps():
        try:
            check_init_from(config, model_config)
        except ConfigError:
            checkpointer.close()
            raise
    trainer = Trainer(config, make_mesh(config.mesh.shape))
    iterator = iter(_dataset(config, trainer, seed=config.seed))
    held_out = _held_out(config, trainer)
    state = checkpointer.restore_latest(trainer.abstract_state(), iterator)
    state = trainer.init_state() if state is None else state
    if jax.process_index() == 0:
        (workdir / RUN_CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))
    peak = config.train.peak_flops or flops.peak_flops(dtype=trainer.model_config.compute_dtype)
    steps, start = config.train.steps, int(state.step)
    writer, preemption = telemetry.MetricsWriter(workdir, start), _Preemption(start)
    # The host reads batch t+1 while the device runs step t; the wrapper's state is that of the last batch taken.
    iterator = grain.experimental.ThreadPrefetchDatasetIterator(iterator, PREFETCH_BATCHES)
    window, tick = [], time.perf_counter()
    progress = tqdm(total=steps, initial=start, disable=jax.process_index() != 0, desc="train")
    try:
        # Between log steps nothing here waits for the device (tests/test_train_loop.py checks it).
        for step in range(start + 1, steps + 1):
            profiler.before_step(step)
            state, metrics = trainer.step(state, next(iterator))
            window.append(metrics)  # device scalars, fetched at the next log step
            log_step = step % config.train.log_every == 0 or step == steps
            stop = preemption.reached(step, log_step)
            saved = checkpointer.save(step, state, iterator, force=stop or step == steps)
            if log_step or stop:
                window = jax.device_get(window)
                halted = [int(m["halted_at"]) for m in window if int(m["halted_at"]) >= 0]
                if halted:  # train.skip_nonfinite=False: the step froze the state at the bad step
                    raise FloatingPointError(
                        f"non-finite gradient at step {halted[0]}: it and the steps after it applied no update, and "
                        f"the state (also in any checkpoint written since) is the one from before step {halted[0]} "
                        "(set train.skip_nonfinite=True to skip such updates instead)")
                record = {"step": step, **summarize(window, trainer, time.perf_counter() - tick, peak)}
                writer.write(record)
                progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_sec']:.0f}")
                window, tick = [], time.perf_counter()
            if held_out is not None and (step % config.eval.every == 0 or step == steps):
                writer.write({"step": step, **held_out(state.params)})
            if saved:
                writer.sync()  # the records up to a checkpoint outlive a crash after it
            profiler.after_step(step, state)
            progress.update(1)
            if stop:
                break
    finally:
        profiler.stop()
        iterator.close()
        preemption.close()
        progress.close()
        writer.close()
        checkpointer.wait()
        checkpointer.close()
    return state
