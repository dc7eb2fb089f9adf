"""The sharded train step: sharded == single device, one compilation for every (n, k), accumulation,
non-finite handling (the loop: tests/test_train_loop.py; multi-host: tests/test_multihost.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from recurrent_depth import RecurrentDepthLM, init_params
from recurrent_depth.checkpoint.train_state import CHECKPOINTS_DIR, TrainCheckpointer
from recurrent_depth.data.synthetic import progression_batches
from recurrent_depth.errors import ConfigError
from recurrent_depth.model import flops
from recurrent_depth.model.config import ModelConfig
from recurrent_depth.runtime.sharding import make_mesh, resolve_mesh_shape
from recurrent_depth.training.loop import train
from recurrent_depth.training.losses import token_losses
from recurrent_depth.training.step import Trainer

from helpers import TINY, assert_close, load_config, small_config, smooth_optimizer_config


def _batch(config, step=0):
    return next(progression_batches(config.train.batch_size, config.train.seq_len, config.model.vocab_size,
                                    seed=0, start_step=step))


@pytest.fixture(scope="module")
def single_device_step():
    """(metrics, params) after one step of small_config on one device."""
    config = smooth_optimizer_config()
    trainer = Trainer(config, make_mesh((1, 1, 1), jax.devices()[:1]))
    state = trainer.init_state()
    initial = jax.device_get(state.params)
    state, metrics = trainer.step(state, _batch(config))
    return jax.device_get(metrics), jax.device_get(state.params), initial


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1)])
def test_sharded_step_equals_single_device(shape, single_device_step):
    metrics_1, params_1, initial = single_device_step
    config = smooth_optimizer_config()
    trainer = Trainer(config, make_mesh(shape))
    state = trainer.init_state()
    assert trainer.state_shardings.params["core"]["layers_0"]["mlp"]["fc"].spec != jax.sharding.PartitionSpec()
    state, metrics = trainer.step(state, _batch(config))
    assert_close(metrics["loss"], metrics_1["loss"], rtol=1e-6, name="loss")
    assert_close(metrics["grad_norm"], metrics_1["grad_norm"], rtol=1e-6, name="gradient norm")
    assert int(metrics["num_steps_no_grad"]) == int(metrics_1["num_steps_no_grad"])
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(initial)))
    assert moved > 1e-3  # the step really updated the parameters
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(params_1)):
        assert_close(a, b, rtol=1e-5, name="updated parameters")


def test_ten_steps_with_different_depths_compile_once():
    config = _warmup_config()  # the program of test_nonfinite_update_... (compiled once, through the cache)
    trainer = Trainer(config, make_mesh((1, 1, 1), jax.devices()[:1]))
    state = trainer.init_state()
    batches = progression_batches(8, 32, config.model.vocab_size, seed=0)
    depths = set()
    for _ in range(10):
        state, metrics = trainer.step(state, next(batches))
        depths.add((int(metrics["num_steps_no_grad"]), int(metrics["num_steps_with_grad"])))
    assert len(depths) > 3  # the sampled (n, k) really changed
    assert trainer.compilations == 1


def test_gradient_accumulation_equals_the_full_batch():
    results = []
    for microbatches in (1, 4):
        config = smooth_optimizer_config()
        config.model.init_scale = 0.0  # the initial state is then the same for any split of the batch
        config.train.microbatches = microbatches
        trainer = Trainer(config, make_mesh((1, 1, 1), jax.devices()[:1]))
        state, metrics = trainer.step(trainer.init_state(), _batch(config))
        results.append((jax.device_get(metrics), jax.device_get(state.params)))
    assert_close(results[1][0]["loss"], results[0][0]["loss"], rtol=1e-6, name="loss")
    assert_close(results[1][0]["grad_norm"], results[0][0]["grad_norm"], rtol=1e-5, name="grad norm")
    for a, b in zip(jax.tree.leaves(results[1][1]), jax.tree.leaves(results[0][1])):
        assert_close(a, b, rtol=1e-5, name="parameters")


def test_z_loss_and_ignored_labels():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 7, (2, 5)))
    labels = labels.at[0, :2].set(-100)
    total, ce, count = token_losses(logits, labels, z_loss=1e-2)
    lse = np.log(np.exp(np.asarray(logits)).sum(-1))
    picked = np.take_along_axis(np.asarray(logits), np.maximum(np.asarray(labels), 0)[..., None], -1)[..., 0]
    valid = np.asarray(labels) != -100
    assert int(count) == valid.sum()
    np.testing.assert_allclose(ce, ((lse - picked) * valid).sum(), rtol=1e-5)
    np.testing.assert_allclose(total, ((lse - picked + 1e-2 * lse**2) * valid).sum(), rtol=1e-5)


def test_flop_count_knows_the_recurrence():
    huginn = ModelConfig.from_dict(load_config("huginn_3p5b").model)
    # Reference §1.1: ~0.11 TFLOP per token at r = 32 (short sequences, attention negligible).
    assert flops.forward_flops_per_token(huginn, 1, 32) == pytest.approx(0.11e12, rel=0.03)
    it = flops.iteration_flops(huginn, 4096)
    base = flops.train_flops_per_token(huginn, 4096, 24, 8)
    assert flops.train_flops_per_token(huginn, 4096, 25, 8) - base == pytest.approx(it)  # forward only
    assert flops.train_flops_per_token(huginn, 4096, 24, 9) - base == pytest.approx(3 * it)  # forward + backward


@pytest.mark.parametrize("tie, param_dtype", [(True, "float32"), (False, "bfloat16")])
def test_decode_weight_bytes_counts_the_parameters_a_step_reads(tie, param_dtype):
    config = ModelConfig(vocab_size=64, hidden_size=32, num_heads=2, intermediate_size=48, num_prelude_layers=1,
                         num_core_layers=2, num_coda_layers=1, max_seq_len=16, tie_embeddings=tie,
                         param_dtype=param_dtype)
    params = nn.meta.unbox(jax.eval_shape(lambda: init_params(RecurrentDepthLM(config), jax.random.key(0))))
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    core = nbytes(params["core"])
    input_half = params["core"]["adapter"].size // 2 * params["core"]["adapter"].dtype.itemsize
    lookup_only = 0 if tie else nbytes(params["embedding"])  # untied: the embedding is only indexed
    for steps in (1, 5):
        expected = nbytes(params) - lookup_only + (steps - 1) * (core - input_half)
        assert flops.decode_weight_bytes(config, steps) == expected


def test_mesh_shape_resolution_and_errors():
    assert resolve_mesh_shape((1, -1, 2), 8) == (1, 4, 2)
    with pytest.raises(ValueError, match="needs 16 devices"):
        resolve_mesh_shape((2, 4, 2), 8)
    with pytest.raises(ValueError, match="at most one -1"):
        resolve_mesh_shape((-1, -1, 1), 8)
    config = small_config()
    config.train.batch_size = 6
    with pytest.raises(ValueError, match="divisible by the data x fsdp mesh size"):
        Trainer(config, make_mesh((1, 8, 1)))


def _poisoned(trainer, state):
    """`state` with a NaN in the final norm's scale: the next gradient is NaN everywhere."""
    params = jax.device_get(state.params)
    params["ln_f"]["scale"] = params["ln_f"]["scale"].copy()
    params["ln_f"]["scale"][0] = np.nan
    return state.replace(params=jax.device_put(params, trainer.state_shardings.params))


def _warmup_config(**train):
    config = small_config()
    config.train.update(**train)
    config.train.optimizer.update(warmup_steps=10, peak_learning_rate=1e-2)  # lr = 1e-3 * applied updates
    return config


def test_nonfinite_update_is_skipped_and_the_logged_lr_is_the_one_applied():
    """A non-finite gradient's update is skipped and counted; it does not advance the schedule (apply_if_finite),
    and the logged lr follows the updates applied, not the step count."""
    config = _warmup_config()
    trainer = Trainer(config, make_mesh((1, 1, 1), jax.devices()[:1]))
    state, lrs, applied, counts = trainer.init_state(), [], 0, []
    for step in range(1, 6):
        clean = state.params
        state, metrics = trainer.step(_poisoned(trainer, state) if step == 3 else state, _batch(config, step))
        lrs.append(float(metrics["lr"]))
        counts.append(applied)
        if step == 3:
            assert bool(metrics["nonfinite"]) and int(metrics["skipped_updates"]) == 1
            np.testing.assert_array_equal(jax.device_get(state.params["core"]["adapter"]),
                                          jax.device_get(clean["core"]["adapter"]))
            state = state.replace(params=clean)  # undo the poison; the optimizer state is the skipped step's
        else:
            applied += 1
    assert counts == [0, 1, 2, 2, 3]
    np.testing.assert_allclose(lrs, [1e-2 * c / 10 for c in counts], rtol=1e-6)
    assert int(optax.tree_utils.tree_get(state.opt_state, "count")) == applied == 4  # ellis_adam's own count


def test_training_loop_stops_at_a_nonfinite_gradient_and_keeps_the_state_before_it(tmp_path, monkeypatch):
    """skip_nonfinite=False: the loop raises at the next log step naming the bad step; the checkpoint written
    after it holds the state from before it."""
    config = small_config()
    config.train.update(steps=8, log_every=4, skip_nonfinite=False)
    config.checkpoint.update(every=2, async_save=False)
    vocab, calls, step_fn = config.model.vocab_size, [], Trainer.step

    def step_with_a_bad_batch(self, state, batch):
        calls.append(1)
        if len(calls) == 3:  # an out-of-range token id: NaN logits under jit, so a NaN gradient
            batch = dict(batch, inputs=np.full_like(batch["inputs"], vocab))
        return step_fn(self, state, batch)

    monkeypatch.setattr(Trainer, "step", step_with_a_bad_batch)
    with pytest.raises(FloatingPointError, match="non-finite gradient at step 3:"):
        train(config, tmp_path)
    assert len(calls) == 4 and not (tmp_path / "metrics.jsonl").read_text()  # stopped at the first log step
    trainer = Trainer(config, make_mesh((1, 1, 1), jax.devices()[:1]))
    checkpointer = TrainCheckpointer(tmp_path / CHECKPOINTS_DIR, every=1, keep=10, async_save=False)
    restore = ocp.args.Composite(state=ocp.args.StandardRestore(trainer.abstract_state()))
    saved = {s: checkpointer.manager.restore(s, args=restore).state for s in checkpointer.manager.all_steps()}
    checkpointer.close()
    assert sorted(saved) == [2, 4] and int(saved[4].step) == 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(saved[4].params), jax.device_get(saved[2].params))


def test_training_starts_from_a_hugging_face_checkpoint_read_into_its_shards(tiny):
    """train.init_from: the parameters are the checkpoint's, each device holding its ~1/8 share."""
    config = load_config("tiny")  # the huginn-tiny fixture's shape
    config.train.init_from = str(TINY / "checkpoint")
    trainer = Trainer(config, make_mesh((1, 8, 1)))
    state = trainer.init_state()
    assert int(state.step) == 0
    for a, b, sharding in zip(jax.tree.leaves(state.params), jax.tree.leaves(tiny[1]),
                              jax.tree.leaves(trainer.state_shardings.params)):
        assert a.sharding == sharding
        np.testing.assert_array_equal(jax.device_get(a), jax.device_get(b))
    per_device = {}
    for leaf in jax.tree.leaves(state.params):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    assert max(per_device.values()) < 1.1 * sum(x.nbytes for x in jax.tree.leaves(tiny[1])) / 8
    config.model.intermediate_size = 128
    with pytest.raises(ConfigError, match="intermediate_size: checkpoint 96 != config 128"):
        Trainer(config, make_mesh((1, 8, 1))).init_state()
