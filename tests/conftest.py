"""Shared fixtures: the tiny reference checkpoints and compiled functions reused across tests."""

from pathlib import Path

import jax
import numpy as np
import pytest

from recurrent_depth.hf import from_huggingface

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "huginn-tiny"
TINY_242 = FIXTURES / "huginn-tiny-242"


def assert_close(actual, expected, rtol=1e-5, name=""):
    """Max error relative to the reference's largest magnitude (the project's parity criterion)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30)
    assert err <= rtol, f"{name}: max relative error {err:.3g} > {rtol:.1g}"


@pytest.fixture(scope="session")
def tiny():
    """(model, params) of the huginn-tiny reference checkpoint, float32."""
    return from_huggingface(TINY / "checkpoint")


@pytest.fixture(scope="session")
def tiny_forward(tiny):
    """A jitted inference forward whose iteration count is traced, with a trace counter."""
    model, _ = tiny
    traces = []

    @jax.jit
    def forward(params, input_ids, input_states, num_steps):
        traces.append(1)
        return model.apply({"params": params}, input_ids, num_steps=num_steps, input_states=input_states)

    forward.traces = traces
    return forward
