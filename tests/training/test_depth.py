"""Tests for recurrent_depth.training.depth: the paper's log-normal Poisson recurrence draw and the sampler factory."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_depth.training.depth import fixed_num_steps, make_depth_sampler, sample_num_steps

R_BAR, K_BAR, SIGMA, SEED = 32, 8, 0.5, 1234
NUM_DRAWS = 20_000


@jax.jit
def _draw_many(steps):
    """(n, k) for a vector of steps, vectorised with vmap (compiled once for the module)."""
    return jax.vmap(lambda s: sample_num_steps(SEED, s, R_BAR, K_BAR, SIGMA))(steps)


@pytest.fixture(scope="module")
def draws():
    n, k = _draw_many(jnp.arange(NUM_DRAWS, dtype=jnp.int32))
    return np.asarray(n), np.asarray(k)


def test_mean_recurrence_matches_paper(draws):
    """E[r] = r̄ + 1 = 33; tolerance 4 standard errors from Var(r) = E[rate] + Var(rate) (Poisson-log-normal)."""
    n, k = draws
    r = n + k
    var = R_BAR + R_BAR**2 * (math.exp(SIGMA**2) - 1)
    standard_error = math.sqrt(var / NUM_DRAWS)  # ~0.13
    assert abs(r.mean() - (R_BAR + 1)) < 4 * standard_error
    assert r.std() == pytest.approx(math.sqrt(var), rel=0.05)
    assert 28 <= np.median(r) <= 30  # paper Fig. 3: median 29
    assert r.min() >= 1


def test_n_k_relation(draws):
    """k = min(k̄, r) (the last <= k̄ iterations get gradient), n = max(r - k̄, 0); both regimes occur."""
    n, k = draws
    r = n + k
    np.testing.assert_array_equal(k, np.minimum(K_BAR, r))
    np.testing.assert_array_equal(n, np.maximum(r - K_BAR, 0))
    assert (r < K_BAR).any() and (r > K_BAR).any()
    assert n.dtype == np.int32 and k.dtype == np.int32


def test_deterministic_in_seed_and_step():
    a = sample_num_steps(SEED, 7, R_BAR, K_BAR)
    b = sample_num_steps(SEED, 7, R_BAR, K_BAR)
    assert (int(a[0]), int(a[1])) == (int(b[0]), int(b[1]))
    assert a[0].dtype == jnp.int32 and a[0].shape == () and a[1].dtype == jnp.int32
    many_steps = {tuple(map(int, sample_num_steps(SEED, s, R_BAR, K_BAR))) for s in range(10)}
    assert len(many_steps) > 1
    many_seeds = {int(sample_num_steps(seed, 7, R_BAR, K_BAR)[0]) for seed in range(10)}
    assert len(many_seeds) > 1


def test_traced_step_compiles_once(draws):
    traces = 0

    @jax.jit
    def train_step(step):
        nonlocal traces
        traces += 1
        return sample_num_steps(SEED, step, R_BAR, K_BAR, SIGMA)

    n_all, k_all = draws
    for step in range(10):
        n, k = train_step(jnp.int32(step))
        assert (int(n), int(k)) == (n_all[step], k_all[step])  # same as the vmapped and the eager draws
    assert traces == 1
    assert tuple(map(int, sample_num_steps(SEED, 3, R_BAR, K_BAR, SIGMA))) == (n_all[3], k_all[3])


def test_backprop_depth_larger_than_mean():
    """r̄ < k̄: t = 0, s = k̄, so E[r] = k̄ + 1 (the draw never goes below the backprop depth's mean)."""
    draws = 4000
    n, k = jax.vmap(lambda s: sample_num_steps(0, s, 2, 8))(jnp.arange(draws))
    r = np.asarray(n + k)
    standard_error = math.sqrt((8 + 64 * (math.exp(0.25) - 1)) / draws)
    assert abs(r.mean() - 9) < 4 * standard_error
    np.testing.assert_array_equal(np.asarray(k), np.minimum(8, r))


def test_fixed_and_factory():
    assert tuple(map(int, fixed_num_steps(32, 0))) == (32, 0)
    assert fixed_num_steps(3, 1)[0].dtype == jnp.int32
    fixed = make_depth_sampler("fixed", R_BAR, K_BAR)
    assert tuple(map(int, fixed(jnp.int32(5)))) == (24, 8)
    assert tuple(map(int, make_depth_sampler("fixed", 1, 1)(0))) == (0, 1)  # non-recurrent baseline
    assert tuple(map(int, make_depth_sampler("fixed", 4, 8)(0))) == (0, 4)
    assert tuple(map(int, make_depth_sampler("fixed", 32, 8, n=5, k=3)(7))) == (5, 3)
    with pytest.raises(ValueError, match="only used by kind='fixed'"):
        make_depth_sampler("poisson-lognormal", 32, 8, n=5)
    sampler = make_depth_sampler("poisson-lognormal", R_BAR, K_BAR, seed=SEED, sigma=SIGMA)
    assert tuple(map(int, sampler(11))) == tuple(map(int, sample_num_steps(SEED, 11, R_BAR, K_BAR, SIGMA)))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: sample_num_steps(0, 0, 0, 8), "mean_recurrence"),
        (lambda: sample_num_steps(0, 0, 32, -1), "mean_backprop_depth"),
        (lambda: sample_num_steps(0, 0, 32.0, 8), "mean_recurrence"),
        (lambda: sample_num_steps(0, 0, 32, 8, sigma=-0.1), "sigma"),
        (lambda: fixed_num_steps(-1, 0), "n"),
        (lambda: fixed_num_steps(1, -2), "k"),
        (lambda: make_depth_sampler("uniform", 32, 8), "unknown depth sampler kind 'uniform'.*poisson-lognormal"),
        (lambda: make_depth_sampler("fixed", 32, -8), "mean_backprop_depth"),
        (lambda: make_depth_sampler("poisson-lognormal", 32, 8, seed=-1), "seed"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
