"""Tests for recurrent_depth.training.optimizers: ELLIS-Adam vs an independent NumPy reference, decay mask,
schedules, factory."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from recurrent_depth.training.optimizers import ellis_adam, make_optimizer, make_schedule, weight_decay_mask

PEAK, WARMUP, WD = 0.1, 3, 0.5  # large lr / wd so that every term of the update is visible in float32
B1, B2, EPS = 0.9, 0.95, 1e-6
NUM_STEPS = 6


def _params():
    """Pytree with a matrix (decayed), an RMSNorm `scale` and a `qk_bias` (both not decayed)."""
    rng = np.random.default_rng(0)
    return {
        "block": {
            "mlp": {"kernel": rng.normal(size=(4, 3)).astype(np.float32)},
            "norm": {"scale": np.ones(3, np.float32)},
        },
        "attn": {"qk_bias": rng.normal(size=(2, 1, 4)).astype(np.float32)},
    }


def _grads():
    """Gradient sequence: step 3 spikes (x30) on the kernel so update clipping triggers; one `scale` entry is 0 then
    2e-6, so v sits below eps^2 and the stored clamp v <- max(v, eps^2) changes the result."""
    rng = np.random.default_rng(1)
    seq = []
    for i in range(NUM_STEPS):
        g = jax.tree.map(lambda p: (0.01 * rng.normal(size=p.shape)).astype(np.float32), _params())
        g["block"]["norm"]["scale"][0] = 0.0 if i < 3 else 2e-6
        if i == 3:
            g["block"]["mlp"]["kernel"] *= np.float32(30.0)
            g["block"]["mlp"]["kernel"][0, 0] = 0.0
        seq.append(g)
    return seq


def _reference(params, grads_seq, *, update_clipping, atan2, running_init):
    """Independent NumPy float32 ELLIS-Adam (reference §2.4); returns per-step params and per-step max rms."""
    f32 = np.float32
    mask = {"block/mlp/kernel": True, "block/norm/scale": False, "attn/qk_bias": False}
    flat = lambda tree: {  # noqa: E731
        "block/mlp/kernel": tree["block"]["mlp"]["kernel"],
        "block/norm/scale": tree["block"]["norm"]["scale"],
        "attn/qk_bias": tree["attn"]["qk_bias"],
    }
    theta = {k: v.copy() for k, v in flat(params).items()}
    m = {k: np.zeros_like(v) for k, v in theta.items()}
    v = {k: np.zeros_like(x) for k, x in theta.items()}
    history, max_rms = [], []
    for i, grads in enumerate(grads_seq):
        t = i + 1
        lr = f32(PEAK * min(i / WARMUP, 1.0))  # optax convention: the (i+1)-th update sees schedule(i)
        step_rms = 0.0
        for name, g in flat(grads).items():
            if running_init and i == 0:
                m[name], v[name] = g.copy(), g * g
            m[name] = m[name] + f32(1 - B1) * (g - m[name])
            v[name] = f32(B2) * v[name] + f32(1 - B2) * g * g
            eta = lr
            if update_clipping:
                v[name] = np.maximum(v[name], f32(EPS**2))
                rms = np.sqrt(np.mean(g * g / v[name]))
                step_rms = max(step_rms, float(rms))
                eta = eta / max(rms, f32(1.0))
            eta = f32(eta / f32(1 - B1**t))
            if mask[name]:
                theta[name] = theta[name] * (f32(1) - lr / f32(PEAK) * f32(WD))
            denom = np.sqrt(v[name]) / f32(math.sqrt(1 - B2**t))
            direction = np.arctan2(m[name], denom) if atan2 else m[name] / (denom + f32(EPS))
            theta[name] = (theta[name] - eta * direction).astype(f32)
        history.append({k: x.copy() for k, x in theta.items()})
        max_rms.append(step_rms)
    return history, max_rms


_CONFIGS = {
    "paper": dict(update_clipping=True, atan2=True, running_init=True),
    "plain": dict(update_clipping=False, atan2=False, running_init=False),
}
_UPDATE_FNS = {}


def _jitted_update(config):
    """Compiled (once per config) update of ellis_adam with a warmup schedule and the default decay mask."""
    if config not in _UPDATE_FNS:
        opt = ellis_adam(
            make_schedule("constant", PEAK, WARMUP, 100),
            b1=B1, b2=B2, eps=EPS, weight_decay=WD, weight_decay_mask=weight_decay_mask,
            peak_learning_rate=PEAK, **_CONFIGS[config],
        )
        _UPDATE_FNS[config] = (opt, jax.jit(opt.update))
    return _UPDATE_FNS[config]


def _run(config, grads_seq):
    """Apply ellis_adam for every gradient of `grads_seq`; returns per-step params and final state."""
    opt, update = _jitted_update(config)
    params = jax.tree.map(jnp.asarray, _params())
    state = opt.init(params)
    history = []
    for g in grads_seq:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    return history, state


@pytest.mark.parametrize("config", sorted(_CONFIGS))
def test_ellis_adam_matches_numpy_reference(config):
    grads_seq = _grads()
    ref, max_rms = _reference(_params(), grads_seq, **_CONFIGS[config])
    got, state = _run(config, grads_seq)
    assert int(state.count) == NUM_STEPS
    assert state.mu["block"]["mlp"]["kernel"].dtype == jnp.float32
    for step, (r, p) in enumerate(zip(ref, got)):
        for name, leaf in (
            ("block/mlp/kernel", p["block"]["mlp"]["kernel"]),
            ("block/norm/scale", p["block"]["norm"]["scale"]),
            ("attn/qk_bias", p["attn"]["qk_bias"]),
        ):
            np.testing.assert_allclose(leaf, r[name], rtol=1e-6, atol=1e-7, err_msg=f"{config} step {step} {name}")
    if _CONFIGS[config]["update_clipping"]:
        assert max(max_rms) > 2.0, "update clipping never triggered; the test would not cover it"


def test_ellis_adam_first_update_has_zero_lr_and_each_term_matters():
    """Warmup starts at lr 0 (params unchanged); decay, the mask and clipping all change the result."""
    got, _ = _run("paper", _grads())
    p0 = _params()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), got[0], p0)
    # scale / qk_bias are not decayed: without gradient they would stay; the kernel shrinks by (1 - ratio*wd).
    zero_grads = [jax.tree.map(np.zeros_like, g) for g in _grads()]
    z, _ = _run("paper", zero_grads)
    np.testing.assert_array_equal(z[-1]["block"]["norm"]["scale"], p0["block"]["norm"]["scale"])
    np.testing.assert_array_equal(z[-1]["attn"]["qk_bias"], p0["attn"]["qk_bias"])
    ratios = [min(i / WARMUP, 1.0) for i in range(NUM_STEPS)]
    expected = p0["block"]["mlp"]["kernel"] * np.prod([1 - r * WD for r in ratios])
    np.testing.assert_allclose(z[-1]["block"]["mlp"]["kernel"], expected, rtol=1e-5)
    # clipping / atan2 change the trajectory (so the reference comparison is discriminating).
    ref_unclipped, _ = _reference(_params(), _grads(), update_clipping=False, atan2=True, running_init=True)
    assert not np.allclose(got[-1]["block"]["mlp"]["kernel"], ref_unclipped[-1]["block/mlp/kernel"], rtol=1e-4)


def test_ellis_adam_argument_errors():
    sched = make_schedule("constant", 1.0, 1, 10)
    with pytest.raises(ValueError, match="peak_learning_rate"):
        ellis_adam(sched)
    with pytest.raises(ValueError, match="b2"):
        ellis_adam(1e-3, b2=1.0)
    with pytest.raises(ValueError, match="eps"):
        ellis_adam(1e-3, eps=0.0)
    with pytest.raises(ValueError, match="peak_learning_rate"):
        ellis_adam(sched, peak_learning_rate=0.0)
    opt = ellis_adam(1e-3)
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="params"):
        opt.update(params, opt.init(params))


def test_weight_decay_mask_nested_dict():
    x = np.zeros(2)
    params = {
        "transformer": {
            "wte": {"embedding": x},
            "core_block": [
                {"norm_1": {"scale": x}, "attn": {"qk_bias": x, "Wqkv": {"kernel": x}}},
                {"mlp": {"fc": {"kernel": x}}, "norm_4": {"scale": x}},
            ],
            "ln_f": {"scale": x},
        },
        "lm_head": {"kernel": x},
        "scale_like": {"scale_kernel": x},
    }
    expected = {
        "transformer": {
            "wte": {"embedding": True},
            "core_block": [
                {"norm_1": {"scale": False}, "attn": {"qk_bias": False, "Wqkv": {"kernel": True}}},
                {"mlp": {"fc": {"kernel": True}}, "norm_4": {"scale": False}},
            ],
            "ln_f": {"scale": False},
        },
        "lm_head": {"kernel": True},
        "scale_like": {"scale_kernel": True},
    }
    assert weight_decay_mask(params) == expected


def test_weight_decay_mask_skips_value_wrappers():
    """Boxed leaves (linen `LogicallyPartitioned`, nnx `Param`) are named by their key, not by `.value`."""
    from flax import linen as nn
    from flax import nnx

    boxed = {"norm": {"scale": nn.LogicallyPartitioned(np.ones(3), ("norm",))},
             "mlp": {"kernel": nn.LogicallyPartitioned(np.ones((3, 2)), ("embed", "mlp"))}}
    assert nn.meta.unbox(weight_decay_mask(boxed)) == {"norm": {"scale": False}, "mlp": {"kernel": True}}

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.proj = nnx.Linear(2, 3, use_bias=False, rngs=rngs)
            self.norm = nnx.RMSNorm(3, rngs=rngs)

    mask = weight_decay_mask(nnx.state(Tiny(nnx.Rngs(0)), nnx.Param))
    assert jax.tree.leaves(mask["proj"]) == [True]
    assert jax.tree.leaves(mask["norm"]) == [False]


@pytest.mark.parametrize(
    "kind, extra, points",
    [
        ("constant", {}, {0: 0.0, 5: 0.5, 10: 1.0, 55: 1.0, 100: 1.0, 1000: 1.0}),
        ("cosine", {"end_value": 0.1}, {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.55, 100: 0.1, 1000: 0.1}),
        ("wsd", {"decay_steps": 20}, {0: 0.0, 5: 0.5, 10: 1.0, 55: 1.0, 80: 1.0, 90: 0.5, 100: 0.0, 1000: 0.0}),
    ],
)
def test_schedule_values(kind, extra, points):
    sched = make_schedule(kind, 1.0, 10, 100, **extra)
    for step, value in points.items():
        assert float(sched(step)) == pytest.approx(value, abs=1e-6), (kind, step)


def test_schedule_without_warmup_starts_at_peak():
    assert float(make_schedule("constant", 2.0, 0, 10)(0)) == pytest.approx(2.0)
    assert float(make_schedule("wsd", 2.0, 0, 10, decay_steps=10)(5)) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (("linear", 1.0, 1, 10), {}, "unknown schedule kind 'linear'.*constant, cosine, wsd"),
        (("constant", 0.0, 1, 10), {}, "peak"),
        (("constant", 1.0, -1, 10), {}, "warmup_steps"),
        (("constant", 1.0, 1.5, 10), {}, "warmup_steps"),
        (("constant", 1.0, 11, 10), {}, "warmup_steps"),
        (("constant", 1.0, 1, 0), {}, "total_steps"),
        (("cosine", 1.0, 10, 10), {}, "total_steps"),
        (("cosine", 1.0, 1, 10), {"end_value": 2.0}, "end_value"),
        (("cosine", 1.0, 1, 10), {"decay_steps": 5}, "decay_steps"),
        (("constant", 1.0, 1, 10), {"end_value": 0.5}, "end_value"),
        (("wsd", 1.0, 1, 10), {}, "decay_steps"),
        (("wsd", 1.0, 1, 10), {"decay_steps": 10}, "decay_steps"),
        (("wsd", 1.0, 1, 10), {"decay_steps": 0}, "decay_steps"),
    ],
)
def test_schedule_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(*args, **kwargs)


_OPT_KW = dict(peak_learning_rate=0.1, weight_decay=0.1, b1=B1, b2=B2, eps=EPS)


@pytest.mark.parametrize("name", ["adamw", "ellis_adam"])
def test_make_optimizer_clips_global_norm(name):
    """Step 1 is under the clip norm, step 2 (norm 10) is clipped to 1: equals the bare optimizer on clipped grads."""
    sched = make_schedule("constant", 0.1, 1, 100)
    params = {"w": jnp.arange(6.0).reshape(2, 3), "norm": {"scale": jnp.ones(3)}}
    rng = np.random.default_rng(2)
    g1 = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    g1 = jax.tree.map(lambda g: g * (0.5 / optax.tree.norm(g1)), g1)
    g2 = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    g2 = jax.tree.map(lambda g: g * (10.0 / optax.tree.norm(g2)), g2)
    g2_clipped = jax.tree.map(lambda g: g / 10.0, g2)

    def run(opt, grads):
        p, state = params, opt.init(params)
        for g in grads:
            updates, state = opt.update(g, state, p)
            p = optax.apply_updates(p, updates)
        return p

    clipped = run(make_optimizer(name, sched, grad_clip_norm=1.0, **_OPT_KW), [g1, g2])
    bare = make_optimizer(name, sched, grad_clip_norm=None, **_OPT_KW)
    expected = run(bare, [g1, g2_clipped])
    unclipped = run(bare, [g1, g2])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), clipped, expected)
    assert not np.allclose(clipped["w"], unclipped["w"], rtol=1e-4)
    # grad_clip_norm <= 0 also disables clipping
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
        run(make_optimizer(name, sched, grad_clip_norm=0.0, **_OPT_KW), [g1, g2]),
        unclipped,
    )


def test_make_optimizer_unknown_name():
    with pytest.raises(ValueError, match="'sgd'.*adamw, ellis_adam"):
        make_optimizer("sgd", 1e-3, grad_clip_norm=1.0, **_OPT_KW)
