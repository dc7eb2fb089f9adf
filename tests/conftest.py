"""Shared fixtures: the tiny reference checkpoints and compiled functions reused across tests."""

import atexit
import os
import shutil
import tempfile

# Eight fake CPU devices for the sharding tests; must be set before jax starts its backend.  CPU only, also in
# subprocesses: with the `tpu` extra installed jax would otherwise probe for TPUs (the AOT tests still compile
# for TPU topologies).
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the session and the processes it starts (train.py, eval.py, workers):
# a program that several of them compile is compiled once.  The in-memory jit caches that tests count are unchanged.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax
import pytest

from recurrent_depth.checkpoint.huggingface import from_huggingface

from helpers import TINY


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

