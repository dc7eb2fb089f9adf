"""FLOP counts for MFU and HFU against the matmuls the compiled train step really contains: its jaxpr (exact, with
every loop's trip count) and XLA's cost analysis (which counts each loop body once)."""

import math

import jax
import jax.numpy as jnp
import pytest

from recurrent_depth.model import flops
from recurrent_depth.runtime.sharding import make_mesh
from recurrent_depth.training.step import Trainer

from helpers import small_config


def matmul_flops(jaxpr, while_trips: int) -> float:
    """2 x output size x contraction size of every dot_general, scan bodies times their length, while-loop bodies
    (the traced no-gradient loop) times `while_trips`."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
            continue
        trips = {"scan": eqn.params.get("length", 1), "while": while_trips}.get(eqn.primitive.name, 1)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jax.extend.core.Jaxpr):
                    total += trips * matmul_flops(sub, while_trips)
    return total


def trainer(remat_policy: str, hidden: int = 64, mlp: int = 96, seq_len: int = 32, vocab: int = 512) -> Trainer:
    config = small_config()
    config.model.update(remat_policy=remat_policy, mean_backprop_depth=3, hidden_size=hidden, intermediate_size=mlp,
                        vocab_size=vocab, max_seq_len=max(seq_len, config.model.max_seq_len))
    config.train.update(batch_size=2, seq_len=seq_len)
    return Trainer(config, make_mesh((1, 1, 1), jax.devices()[:1]))


def step_jaxpr(t: Trainer):
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), t.abstract_state().params)
    batch = {k: jax.ShapeDtypeStruct((2, t.config.train.seq_len), jnp.int32) for k in ("inputs", "labels")}
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    return jax.make_jaxpr(t._loss_and_grads)(params, batch, scalar, scalar, jax.random.key(0)).jaxpr


@pytest.mark.parametrize("policy,seq_len", [("nothing", 32), ("names", 32), ("dots", 32), ("matmuls", 32),
                                            ("everything", 32),
                                            ("nothing", 192), ("everything", 192)])
def test_hardware_flops_equal_the_steps_matmuls(policy, seq_len):
    """Traced n and k: the step runs n no-gradient iterations and all mean_backprop_depth gradient ones; at 192
    tokens the attention runs in three causal blocks, computing 2/3 of the score square."""
    t = trainer(policy, seq_len=seq_len)
    tokens, seq = 2 * t.config.train.seq_len, t.config.train.seq_len
    jaxpr = step_jaxpr(t)
    for n in (0, 5):
        expected = tokens * flops.hardware_train_flops_per_token(t.model_config, seq, n)
        assert matmul_flops(jaxpr, while_trips=n) == pytest.approx(expected, rel=1e-12), (policy, n)


def test_score_fraction_follows_the_attention_blocks():
    cfg = trainer("nothing").model_config
    assert flops.score_fraction(cfg, 32) == 1.0  # too short to split
    assert flops.score_fraction(cfg, 256) == 5 / 8  # four blocks of 64
    assert flops.score_fraction(cfg.replace(attention_impl="splash"), 4096) == 9 / 16  # eight blocks of 512
    assert flops.score_fraction(cfg.replace(attention_impl="cudnn"), 4096) == 1.0
    # Model FLOPs keep the full square (PaLM's convention); hardware FLOPs drop what the blocks skip.
    assert flops.hardware_train_flops_per_token(cfg, 256, 4) < flops.hardware_train_flops_per_token(
        cfg.replace(attention_impl="cudnn"), 256, 4)
    assert flops.train_flops_per_token(cfg, 256, 4, 3) == flops.train_flops_per_token(
        cfg.replace(attention_impl="cudnn"), 256, 4, 3)


def test_model_flops_are_the_hardware_flops_without_remat_and_masking():
    t = trainer("everything")
    cfg, seq = t.model_config, t.config.train.seq_len
    k = cfg.mean_backprop_depth
    assert flops.train_flops_per_token(cfg, seq, 4, k) == flops.hardware_train_flops_per_token(cfg, seq, 4)
    # Fewer gradient iterations than the step computes: model FLOPs count only k, hardware FLOPs all of them.
    it = flops.iteration_flops(cfg, seq)
    assert (flops.hardware_train_flops_per_token(cfg, seq, 4) - flops.train_flops_per_token(cfg, seq, 4, k - 1)
            == pytest.approx(3 * it))
    nothing = cfg.replace(remat_policy="nothing")
    assert (flops.hardware_train_flops_per_token(nothing, seq, 4) - flops.train_flops_per_token(nothing, seq, 4, k)
            == pytest.approx(k * it))  # per-iteration remat recomputes each gradient iteration's forward once


def test_hardware_flops_agree_with_xla_cost_analysis():
    """XLA's count (all ops, each loop body once) against ours with one iteration per loop, at a width where the
    matmuls dominate the elementwise work: ours is a lower bound within a few percent, for the step with and
    without rematerialisation, and so is the difference between the two (the recomputed forward)."""
    counted, ours = {}, {}
    for policy in ("nothing", "everything"):
        t = trainer(policy, hidden=256, mlp=1024, seq_len=64, vocab=2048)
        analysis = t.lower().compile().cost_analysis()
        counted[policy] = (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
        cfg, seq = t.model_config.replace(mean_backprop_depth=1), t.config.train.seq_len
        ours[policy] = t.config.train.batch_size * seq * flops.hardware_train_flops_per_token(cfg, seq, 1)
        assert 1.0 <= counted[policy] / ours[policy] < 1.07, policy
    remat = (counted["nothing"] - counted["everything"]) / (ours["nothing"] - ours["everything"])
    assert 1.0 <= remat < 1.1


def test_chip_peaks_by_device_kind():
    assert flops.chip_peak_flops("TPU v5 lite") == 197e12
    assert flops.chip_peak_flops("TPU v5") == 459e12
    assert flops.chip_peak_flops("TPU v6 lite") == 918e12
    assert flops.chip_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.chip_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert flops.chip_peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert flops.chip_peak_flops("some new chip") is None
    # On CPU the peak is measured (a positive, finite rate).
    assert 0 < flops.peak_flops(jax.devices()[0]) < math.inf
