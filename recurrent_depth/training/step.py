"""The sharded train step: randomized depth, truncated backprop, gradient accumulation, the paper's optimizer.

`Trainer` builds everything from a config (mesh, model, optimizer, sharded state) and exposes one compiled
`step(state, batch) -> (state, metrics)` that serves every sampled (n, k): n and k are traced values drawn
inside the step from (seed, step), identical on every host without communication.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from recurrent_depth.checkpoint.loading import check_config, load_model, load_model_config
from recurrent_depth.data.batch import BATCH_KEYS
from recurrent_depth.errors import ConfigError
from recurrent_depth.model.config import ModelConfig
from recurrent_depth.model.lm import RecurrentDepthLM, init_params
from recurrent_depth.runtime import sharding
from recurrent_depth.training.depth import make_depth_sampler
from recurrent_depth.training.losses import token_losses
from recurrent_depth.training.optimizers import make_optimizer, make_schedule
from recurrent_depth.training.validation import validate_run_config


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any


def build_optimizer(config: ml_collections.ConfigDict, total_steps: int):
    """(optax transformation, schedule) from `config.train.optimizer`; non-finite updates are skipped and counted."""
    opt = config
    schedule = make_schedule(opt.schedule, opt.peak_learning_rate, opt.warmup_steps, total_steps,
                             decay_steps=opt.decay_steps, end_value=opt.end_learning_rate)
    tx = make_optimizer(opt.name, schedule, peak_learning_rate=opt.peak_learning_rate,
                        weight_decay=opt.weight_decay, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                        grad_clip_norm=opt.grad_clip_norm, moment_dtype=jnp.dtype(opt.moment_dtype))
    # Skips (and counts) updates whose gradients are not finite; never gives up and applies them.
    return optax.apply_if_finite(tx, max_consecutive_errors=2**30), schedule


def build_depth_sampler(config: ml_collections.ConfigDict, model_config: ModelConfig, seed: int):
    depth = config
    extra = {"n": depth.n, "k": depth.k} if depth.kind == "fixed" else {}
    return make_depth_sampler(depth.kind, model_config.mean_recurrence, model_config.mean_backprop_depth,
                              seed=seed, sigma=depth.sigma, **extra)


def check_init_from(config: ml_collections.ConfigDict, model_config: ModelConfig) -> None:
    """ConfigError naming `train.init_from` if it is set and missing, or naming each architectural field in which
    its model config differs from the run's; reads the checkpoint's config file alone (no parameters)."""
    source = config.train.get("init_from")
    if not source:
        return
    try:
        check_config(load_model_config(source), model_config, "this run's model config")
    except (FileNotFoundError, ValueError) as err:  # ConfigError and CheckpointError are ValueErrors
        raise ConfigError(f"train.init_from={source!r}: {err}") from None


@dataclasses.dataclass
class Trainer:
    """Mesh, model, optimizer and the compiled, sharded train step for one config."""

    config: ml_collections.ConfigDict
    mesh: Mesh

    def __post_init__(self):
        cfg = self.config
        # Every section checked (ConfigError naming the field) before anything is built or compiled.
        self.model_config = validate_run_config(cfg, mesh_shape=self.mesh.shape)
        self.model = RecurrentDepthLM(self.model_config)
        self.rules = sharding.rules_from_config(cfg.mesh.rules)
        train = cfg.train
        self.tx, self.schedule = build_optimizer(train.optimizer, train.steps)
        self.depth_sampler = build_depth_sampler(train.depth, self.model_config, cfg.seed)
        self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
        self.batch_rows = sharding.batch_rows(self.batch_sharding, train.batch_size)  # the rows this process reads
        self.state_shardings = self._state_shardings()
        self.compilations = 0
        self._step = jax.jit(self._train_step, in_shardings=(self.state_shardings, self.batch_sharding),
                             out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
                             donate_argnums=0)

    def context(self) -> contextlib.ExitStack:
        """Mesh and logical rules in scope, so the model's activation constraints apply while tracing."""
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def _state_shardings(self) -> TrainState:
        boxed = jax.eval_shape(lambda: init_params(self.model, jax.random.key(0)))
        param_shardings = sharding.logical_shardings(boxed, self.mesh, self.rules)
        opt_shapes = jax.eval_shape(self.tx.init, nn.meta.unbox(boxed))
        opt_shardings = optax.tree_map_params(self.tx, lambda _, s: s, opt_shapes, param_shardings,
                                              transform_non_params=lambda _: sharding.replicated(self.mesh))
        return TrainState(step=sharding.replicated(self.mesh), params=param_shardings, opt_state=opt_shardings)

    def init_state(self, rng: jax.Array | None = None) -> TrainState:
        """Sharded parameters and a fresh optimizer state: from `train.init_from` (a Hugging Face checkpoint,
        parameter checkpoint or workdir, each tensor read straight into its shard) if set and no `rng` is given,
        else freshly initialised (seeded by config.seed by default)."""
        source = self.config.train.get("init_from")
        if source and rng is None:
            return self._load_state(source)
        rng = jax.random.key(self.config.seed) if rng is None else rng
        with self.context():
            return jax.jit(self._init_fn, out_shardings=self.state_shardings)(rng)

    def _load_state(self, source: str) -> TrainState:
        check_init_from(self.config, self.model_config)
        _, params = load_model(source, dtype=self.model_config.param_dtype, shardings=self.state_shardings.params)

        def init(params):
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

        with self.context():
            return jax.jit(init, out_shardings=self.state_shardings)(params)

    def _init_fn(self, key) -> TrainState:
        params = nn.meta.unbox(init_params(self.model, key))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

    def _loss_and_grads(self, params, batch, n, k, rng):
        def loss_fn(p):
            out = self.model.apply({"params": p}, batch["inputs"], num_steps=(n, k),
                                   segment_ids=batch.get("segment_ids"), positions=batch.get("positions"),
                                   rngs={"state": rng})
            total, ce, count = token_losses(out.logits, batch["labels"], self.config.train.z_loss)
            return total, (ce, count)

        return jax.grad(loss_fn, has_aux=True)(params)

    def _train_step(self, state: TrainState, batch: dict):
        self.compilations += 1  # runs only while tracing
        n, k = self.depth_sampler(state.step)
        rng = jax.random.fold_in(jax.random.key(self.config.seed), state.step)
        m = self.config.train.microbatches
        if m == 1:
            grads, (ce, count) = self._loss_and_grads(state.params, batch, n, k, rng)
        else:
            # [batch, ...] -> [micro, batch / micro, ...], keeping each device's rows local.
            micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1), batch)

            def accumulate(carry, xs):
                index, mb = xs
                g, (c, t) = self._loss_and_grads(state.params, mb, n, k, jax.random.fold_in(rng, index))
                return jax.tree.map(jnp.add, carry, (g, c, t)), None

            zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
            (grads, ce, count), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(m), micro))
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.tree.norm(grads)
        nonfinite = ~jnp.isfinite(grad_norm)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                               opt_state=opt_state)
        # apply_if_finite advances the inner optimizer (and its schedule) only on applied updates: the lr this
        # step applies is the schedule at the number of updates applied so far, not at the step count.
        applied = state.step - state.opt_state.total_notfinite
        halted_at = jnp.int32(-1)
        if not self.config.train.skip_nonfinite:
            # Stop at the first non-finite gradient without a host sync: this and every later step apply nothing
            # and keep the state from before it (notfinite_count marks it halted); the loop raises at its next log.
            halted = nonfinite | (state.opt_state.notfinite_count > 0)
            frozen = state.replace(opt_state=state.opt_state._replace(
                notfinite_count=jnp.ones_like(state.opt_state.notfinite_count)))
            new_state = jax.tree.map(lambda old, new: jnp.where(halted, old, new), frozen, new_state)
            halted_at = jnp.where(halted, state.step + 1, -1).astype(jnp.int32)
        metrics = {
            "loss": ce / denom,
            "grad_norm": grad_norm,
            "lr": self.schedule(applied),
            "num_steps_no_grad": n,
            "num_steps_with_grad": k,
            "tokens": count,
            "nonfinite": nonfinite,
            "skipped_updates": new_state.opt_state.total_notfinite,
            "halted_at": halted_at,  # the step (1-based) whose non-finite gradient stopped training, else -1
        }
        return new_state, metrics

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with this mesh's shardings: the restore target of a checkpoint."""
        shapes = jax.eval_shape(self._init_fn, jax.random.key(0))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                            self.state_shardings)

    def abstract_batch(self, segment_ids: bool = True) -> dict:
        """ShapeDtypeStructs of a global batch (for ahead-of-time compilation)."""
        shape = (self.config.train.batch_size, self.config.train.seq_len)
        keys = BATCH_KEYS if segment_ids else BATCH_KEYS[:2]
        return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding) for k in keys}

    def lower(self):
        """The train step lowered for abstract state and batch: `.compile()` works for any mesh, even one of
        TPU devices from `jax.experimental.topologies` on a machine without TPUs."""
        state, batch = self.abstract_state(), self.abstract_batch()  # outside the mesh: eval_shape runs eagerly
        with self.context():
            return self._step.lower(state, batch)

    def global_batch(self, local_batch: dict) -> dict:
        """This process's rows (`batch_rows`) as global arrays sharded over the batch axes."""
        unknown = set(local_batch) - set(BATCH_KEYS)
        if unknown:
            raise ValueError(f"unknown batch keys {sorted(unknown)}; expected {BATCH_KEYS}")
        return sharding.global_batch(local_batch, self.batch_sharding, self.batch_rows, self.config.train.batch_size)

    def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One optimizer step on this process's rows {inputs, labels[, segment_ids, positions]} [batch, seq]."""
        with self.context():
            return self._step(state, self.global_batch(batch))
