"""Faults while an async checkpoint is being saved (issue #26): train.py SIGKILLed with the save of step HELD
written but not committed, locally and in a bucket of the GCS emulator; and the emulator unreachable (through a
proxy switched down) while that save commits briefly (the commit is retried and the run finishes).  An outage past
the storage client's retries (one clear line naming the step) is checked at the checkpointer's level, which is
cheaper.  The commit is held back by tests/save_fault_worker.py; every run is a train.py subprocess on one CPU
device, compared bitwise with one uninterrupted run; the persistent compilation cache (conftest) is shared."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import jax
import numpy as np
import pytest
from etils import epath
from orbax.checkpoint._src.path import atomicity

from recurrent_depth.checkpoint.train_state import CHECKPOINTS_DIR, TrainCheckpointer, load_workdir_params
from recurrent_depth.errors import CheckpointError
from recurrent_depth.training.telemetry import read_metrics

from helpers import local_iterator, single_cpu_env, small_config

WORKER = Path(__file__).parents[1] / "save_fault_worker.py"
STEPS, EVERY, HELD = 8, 3, 6  # checkpoints at 3, 6 (held back) and 8 (the final one, forced)
FLAGS = ["--config=configs/tiny.py", f"--config.train.steps={STEPS}", "--config.train.batch_size=8",
         "--config.train.seq_len=32", "--config.train.log_every=1", f"--config.checkpoint.every={EVERY}",
         "--config.checkpoint.async_save=True", "--config.eval.every=0", "--config.train.peak_flops=1e12",
         "--config.train.optimizer.warmup_steps=2"]
TIMEOUT = 300  # seconds for any one run
SHORT_OUTAGE = 5  # seconds: well within the retries of gcsfs, which writes Orbax's commit file


@pytest.mark.parametrize("error, raised", [(lambda: ConnectionResetError(104, "Connection reset by peer"),
                                            CheckpointError),
                                           (lambda: TypeError("a bug"), TypeError)], ids=["transient", "other"])
def test_a_failed_async_save_raises_at_the_next_save_naming_its_step(tmp_path, monkeypatch, error, raised):
    """A save that fails in the background surfaces when the next one is due, naming its own step: a storage error
    past its client's retries as one CheckpointError line that says to rerun, anything else as it is, with a note."""
    real = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        if self.get_final().name == "2":
            raise error()
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
    checkpointer = TrainCheckpointer(tmp_path, every=1, keep=5, async_save=True)
    iterator, state = local_iterator(small_config()), {"w": np.arange(3.0)}
    assert checkpointer.save(1, state, iterator) and checkpointer.save(2, state, iterator)
    with pytest.raises(raised) as failed:
        checkpointer.save(3, state, iterator)
    checkpointer.wait()  # raised once
    checkpointer.close()
    said = " ".join([str(failed.value), *getattr(failed.value, "__notes__", ())])
    assert f"saving checkpoint {tmp_path / '2'}" in said and "resumes from the last committed" in said
    assert ("run the same command again once the storage is reachable" in said) == (raised is CheckpointError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2.orbax-checkpoint-tmp"]


class Run:
    """tests/save_fault_worker.py training into `workdir`, holding the commit of step `hold` (None: none) until
    `release` exists (None: forever); its output goes to `log`."""

    started: list = []  # every Run, so that none outlives its test (a held one would wait forever)

    def __init__(self, workdir, log: Path, hold: int | None = None, release: Path | None = None, env=None):
        self.log, self.marker = log, log.with_suffix(".held")
        args = ["-" if hold is None else str(hold), str(self.marker), "-" if release is None else str(release)]
        with log.open("w") as out:
            self.proc = subprocess.Popen([sys.executable, str(WORKER), *args, f"--workdir={workdir}", *FLAGS],
                                         cwd=WORKER.parents[1], env=dict(single_cpu_env(), **(env or {})),
                                         stdout=out, stderr=subprocess.STDOUT)
        Run.started.append(self)

    def wait_until_held(self, workdir, records: int = HELD - EVERY) -> str:
        """The path of the held, uncommitted checkpoint, once its commit is waiting and the records of the steps up
        to `records` are in `workdir` (in a bucket they are uploaded in the background)."""
        deadline = time.time() + TIMEOUT
        while not self.marker.exists() or max(_losses(workdir), default=0) < records:
            assert self.proc.poll() is None and time.time() < deadline, f"no save was held:\n{self.output()}"
            time.sleep(0.02)
        return self.marker.read_text()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait() == -signal.SIGKILL

    def stop(self) -> None:
        """Kills the run if it is still running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def finish(self) -> int:
        """The exit status (after TIMEOUT: killed, and a failure)."""
        try:
            return self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"the run hung:\n{self.output()}")

    def succeed(self) -> None:
        assert self.finish() == 0, self.output()

    def output(self) -> str:
        return self.log.read_text().replace("\r", "\n")

    def restored(self) -> int:
        """The step the run restored (0: none)."""
        lines = [line for line in self.output().splitlines() if line.startswith("restored step ")]
        assert len(lines) == 1, self.output()
        return int(lines[0].split()[-1])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, started at once: a function that waits for it and returns (its losses by step, its
    final parameters).  The tests' runs start once it has logged its first step: by then its compilations are in
    the persistent cache, where they find them (started together, each run would compile them)."""
    directory = tmp_path_factory.mktemp("reference")
    run = Run(directory / "run", directory / "run.log")
    deadline = time.time() + TIMEOUT
    while not _losses(directory / "run"):
        assert run.proc.poll() is None and time.time() < deadline, f"the reference run logged no step:\n{run.output()}"
        time.sleep(0.05)
    result = []

    def get():
        if not result:
            run.succeed()
            result.append((_losses(directory / "run"), _params(directory / "run")))
        return result[0]

    yield get
    run.stop()


@pytest.fixture(autouse=True)
def _stop_runs():
    """Kills the runs a test started and left running (it failed)."""
    before = len(Run.started)
    yield
    for run in Run.started[before:]:
        run.stop()


def _losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def _params(workdir) -> list[np.ndarray]:
    return [np.asarray(p) for p in jax.tree.leaves(load_workdir_params(workdir)[1])]


def _committed(checkpoints: epath.Path) -> list[str]:
    """The names in a checkpoints folder, each committed step's as it is, anything else marked '(uncommitted)'."""
    names = []
    for path in sorted(checkpoints.iterdir(), key=lambda p: p.name):
        committed = path.name.isdigit() and (path / "commit_success.txt").exists()
        names.append(path.name if committed else f"{path.name} (uncommitted)")
    return names


def _assert_resumed_bitwise(workdir, run: Run, reference) -> None:
    """`run` restored the last checkpoint committed before HELD (not the uncommitted HELD, whose arrays would give
    the same numbers), saved and committed HELD anew and the final one, and the run's losses (each step once; those
    after the restored step redone) and final parameters equal the uninterrupted run's bitwise."""
    assert run.restored() == HELD - EVERY
    assert _committed(epath.Path(workdir) / CHECKPOINTS_DIR) == [str(HELD - EVERY), str(HELD), str(STEPS)]
    _assert_as_uninterrupted(workdir, reference)


def _assert_as_uninterrupted(workdir, reference) -> None:
    losses, params = reference()
    resumed = _losses(workdir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == losses[step], f"step {step}: {resumed[step]!r} != {losses[step]!r}"
    for a, b in zip(_params(workdir), params, strict=True):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


class Proxy:
    """A TCP proxy on localhost in front of the server at `upstream` (host, port), which the test switches down (new
    connections refused, open ones cut) and up again: the storage as clients see it when it goes away and comes
    back, with its data kept."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream, self.lock, self.connections, self.listener = upstream, threading.Lock(), set(), None
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.up()

    def up(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))  # (SO_REUSEADDR: the port again at once)
        listener.settimeout(0.05)
        with self.lock:
            self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self.lock:
            listener, connections, self.listener, self.connections = self.listener, self.connections, None, set()
        if listener is not None:
            listener.close()
        for s in connections:
            _cut(s)

    def _accept(self, listener) -> None:
        while self.listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client) -> None:
        try:
            server = socket.create_connection(self.upstream)
        except OSError:
            _cut(client)
            return
        with self.lock:
            if self.listener is None:
                pair = ()
            else:
                pair = (client, server)
                self.connections |= {client, server}
        if not pair:
            _cut(client)
            _cut(server)
            return
        pumps = [threading.Thread(target=_pump, args=(a, b), daemon=True) for a, b in (pair, pair[::-1])]
        for p in pumps:
            p.start()
        for p in pumps:
            p.join()
        with self.lock:
            self.connections -= {client, server}
        client.close()
        server.close()


def _pump(source, sink) -> None:
    """Copies `source` to `sink` until either ends, then ends both."""
    try:
        while data := source.recv(1 << 16):
            sink.sendall(data)
    except OSError:
        pass
    _cut(source)
    _cut(sink)


def _cut(s) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


@pytest.fixture
def outage(bucket):
    """(a Proxy in front of the GCS emulator, the environment that sends a run's storage traffic through it); the
    test process itself keeps talking to the emulator directly."""
    emulator = urllib.parse.urlsplit(os.environ["STORAGE_EMULATOR_HOST"])
    proxy = Proxy((emulator.hostname, emulator.port))
    yield proxy, {"STORAGE_EMULATOR_HOST": proxy.url, "TENSORSTORE_GCS_HTTP_URL": proxy.url}
    proxy.down()


# First of the runs: the uninterrupted one has compiled (cold) before it starts, and every run finds the
# compilations cached.
@pytest.mark.slow
def test_a_short_storage_outage_while_a_save_commits_is_retried_and_the_run_finishes(reference, bucket, outage,
                                                                                       tmp_path):
    """The storage goes away as the save of HELD commits and comes back within the storage client's retries
    (gcsfs: 6 tries, about 1, 2, 4, 8 and 16 s apart): the commit goes through late and the run finishes as if
    nothing happened."""
    proxy, env = outage
    workdir, release = bucket / "short-outage", tmp_path / "release"
    run = Run("gs://bkt/short-outage", tmp_path / "run.log", hold=HELD, release=release, env=env)
    run.wait_until_held(workdir, records=HELD + 1)  # all it logs before it waits: none to upload later
    proxy.down()
    release.touch()  # the commit starts against the unreachable storage
    time.sleep(SHORT_OUTAGE)
    proxy.up()
    run.succeed()
    assert run.restored() == 0
    assert _committed(workdir / CHECKPOINTS_DIR) == [str(HELD - EVERY), str(HELD), str(STEPS)]
    _assert_as_uninterrupted(workdir, reference)


@pytest.mark.slow
def test_sigkill_during_an_async_save_resumes_from_the_last_committed_step(reference, tmp_path):
    """Locally Orbax writes the save into <step>.orbax-checkpoint-tmp and commits it by renaming: killed before the
    rename, the run leaves that folder, which the next run ignores and replaces when it saves the step again."""
    workdir = tmp_path / "run"
    killed = Run(workdir, tmp_path / "killed.log", hold=HELD)
    held = killed.wait_until_held(workdir)
    killed.kill()
    assert held == str(workdir / CHECKPOINTS_DIR / f"{HELD}.orbax-checkpoint-tmp")
    assert (Path(held) / "state" / "manifest.ocdbt").exists()  # the arrays are written, only the commit is missing
    assert _committed(epath.Path(workdir) / CHECKPOINTS_DIR) == [str(HELD - EVERY),
                                                                 f"{HELD}.orbax-checkpoint-tmp (uncommitted)"]
    resumed = Run(workdir, tmp_path / "resumed.log")
    resumed.succeed()
    _assert_resumed_bitwise(workdir, resumed, reference)


@pytest.mark.slow
def test_sigkill_during_an_async_save_resumes_from_the_last_committed_step_in_a_bucket(reference, bucket, tmp_path):
    """On GCS Orbax writes the save into <step>/ and commits it by writing <step>/commit_success.txt: killed before
    that, the run leaves <step>/ with its arrays, which the next run ignores and overwrites."""
    run = bucket / "killed-run"
    killed = Run("gs://bkt/killed-run", tmp_path / "killed.log", hold=HELD)
    assert killed.wait_until_held(run) == f"gs://bkt/killed-run/{CHECKPOINTS_DIR}/{HELD}"
    killed.kill()
    assert (run / CHECKPOINTS_DIR / str(HELD) / "state" / "manifest.ocdbt").exists()
    assert _committed(run / CHECKPOINTS_DIR) == [str(HELD - EVERY), f"{HELD} (uncommitted)"]
    resumed = Run("gs://bkt/killed-run", tmp_path / "resumed.log")
    resumed.succeed()
    _assert_resumed_bitwise(run, resumed, reference)
