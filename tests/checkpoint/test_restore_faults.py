"""What a failed checkpoint read leads to: a corrupt newest checkpoint is skipped and moved aside (so its step can
be saved again and the run finishes), a transient storage error is retried and never falls back, and any other
error is raised.  Tiny states on CPU (the save faults of a whole run: test_save_faults.py)."""

import json
import shutil
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from recurrent_depth.checkpoint import train_state
from recurrent_depth.checkpoint.train_state import TrainCheckpointer, restore_fault
from recurrent_depth.errors import CheckpointError

from helpers import local_iterator, small_config


def _state(step: int) -> dict:
    return {"w": np.arange(6, dtype=np.float32).reshape(2, 3) * step, "step": np.int32(step)}


ABSTRACT = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))


def _abstract():
    """ABSTRACT on one device (Orbax would otherwise restore onto the devices that saved)."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), ABSTRACT)


def _saved(directory, steps, every=10) -> TrainCheckpointer:
    """A checkpointer of `directory` holding _state(step) at each of `steps`, with the data iterator there."""
    checkpointer = TrainCheckpointer(directory, every=every, keep=10, async_save=False)
    iterator = local_iterator(small_config())
    for step in range(1, max(steps) + 1):
        next(iterator)
        if step in steps:
            assert checkpointer.save(step, _state(step), iterator, force=True)
    return checkpointer


def _restore(checkpointer, **kwargs):
    """(restored state, the data iterator set to its data state, warning messages)."""
    iterator = local_iterator(small_config())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = checkpointer.restore_latest(_abstract(), iterator, **kwargs)
    return state, iterator, [str(w.message) for w in caught]


def _names(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _truncate_arrays(step_dir):
    """Cuts every array data file of a checkpoint (its OCDBT d/ files) to 7 zero bytes."""
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files
    for f in files:
        f.write_bytes(b"\0" * 7)


def _failing_reads(monkeypatch, error, times: int) -> list:
    """Makes the first `times` reads of a checkpoint's state raise `error()`; returns the paths read so far."""
    real, calls = ocp.StandardCheckpointHandler.restore, []

    def restore(self, directory, *args, **kwargs):
        calls.append(directory)
        if len(calls) <= times:
            raise error()
        return real(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "restore", restore)
    return calls


def test_corrupt_newest_checkpoints_are_moved_aside_and_their_steps_saved_again(tmp_path):
    """The reviewer's case: 30 and 40 unreadable.  Before, the run restored 20 but Orbax declined the save at 30
    and a forced save at 40 raised StepAlreadyExistsError."""
    checkpointer = _saved(tmp_path, (10, 20, 30, 40))
    shutil.rmtree(tmp_path / "30" / "state")
    _truncate_arrays(tmp_path / "40")
    state, iterator, messages = _restore(checkpointer)
    np.testing.assert_array_equal(state["w"], _state(20)["w"])
    assert iterator.get_state() == {"next_index": 20}
    moved = [m for m in messages if m.startswith("moved the corrupt checkpoint")]
    assert len(moved) == 2 and "step 40 (ValueError: OUT_OF_RANGE" in moved[0], messages
    assert "step 30 (FileNotFoundError" in moved[1] and moved[1].endswith(f"{tmp_path / '30.corrupt-1'}")
    assert checkpointer.manager.all_steps() == [10, 20]
    assert _names(tmp_path) == ["10", "20", "30.corrupt-1", "40.corrupt-1"]
    assert (tmp_path / "40.corrupt-1" / "state").is_dir()  # kept for inspection

    # The run goes on to its end: the periodic save at 30 and the final forced one at 40 are written.
    for step in range(21, 41):
        next(iterator)
        assert checkpointer.save(step, _state(step), iterator, force=step == 40) == (step in (30, 40))
    checkpointer.close()
    again = TrainCheckpointer(tmp_path, every=10, keep=10, async_save=False)  # as a resumed run sees it
    assert again.manager.all_steps() == [10, 20, 30, 40]
    state, iterator, messages = _restore(again)
    assert int(state["step"]) == 40 and iterator.get_state() == {"next_index": 40} and not messages

    # Corrupt once more, the step is moved aside under the next free name and saved again.
    _truncate_arrays(tmp_path / "40")
    state, _, _ = _restore(again)
    assert int(state["step"]) == 30 and again.manager.all_steps() == [10, 20, 30]
    assert "40.corrupt-2" in _names(tmp_path) and "40" not in _names(tmp_path)
    assert again.save(40, _state(40), iterator, force=True)
    again.close()


def test_a_reader_falls_back_without_moving_anything(tmp_path):
    checkpointer = _saved(tmp_path, (10, 20))
    shutil.rmtree(tmp_path / "20" / "state")
    state, _, messages = _restore(checkpointer, quarantine=False)
    checkpointer.close()
    assert int(state["step"]) == 10 and any("unreadable" in m for m in messages)
    assert _names(tmp_path) == ["10", "20"]


def test_every_checkpoint_corrupt_raises_and_moves_nothing(tmp_path):
    checkpointer = _saved(tmp_path, (10, 20))
    for step in (10, 20):
        _truncate_arrays(tmp_path / str(step))
    with pytest.raises(CheckpointError, match="every checkpoint in .* is corrupt"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checkpointer.restore_latest(_abstract(), local_iterator(small_config()))
    checkpointer.close()
    assert _names(tmp_path) == ["10", "20"]


def _google_unavailable():
    return pytest.importorskip("google.api_core.exceptions").ServiceUnavailable("backendError")


@pytest.mark.parametrize("error", [
    lambda: ConnectionResetError(104, "Connection reset by peer"),
    lambda: ValueError('UNAVAILABLE: Error reading "w/0.0" in OCDBT database at "gs://b/run/20/state/": '
                       "HTTP response code: 503 with body: Service Unavailable"),
    _google_unavailable,
], ids=["connection-reset", "tensorstore-503", "google-api-503"])
def test_transient_read_errors_are_retried_without_fallback(tmp_path, monkeypatch, error):
    monkeypatch.setattr(train_state, "RETRY_DELAYS", (0.0, 0.01, 0.0))
    checkpointer = _saved(tmp_path, (10, 20))
    calls = _failing_reads(monkeypatch, error, times=2)
    state, iterator, messages = _restore(checkpointer)
    checkpointer.close()
    assert int(state["step"]) == 20 and iterator.get_state() == {"next_index": 20}
    assert len(calls) == 3 and all(c.parent.name == "20" for c in calls)
    assert len([m for m in messages if "retrying in" in m]) == 2, messages
    assert not [m for m in messages if "unreadable" in m or "moved" in m], messages
    assert _names(tmp_path) == ["10", "20"]


def test_transient_errors_past_the_retries_raise_and_keep_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(train_state, "RETRY_DELAYS", (0.0, 0.0))
    checkpointer = _saved(tmp_path, (10, 20))
    calls = _failing_reads(monkeypatch, lambda: TimeoutError("read timed out"), times=100)
    with pytest.raises(TimeoutError) as raised, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checkpointer.restore_latest(_abstract(), local_iterator(small_config()))
    checkpointer.close()
    assert "not falling back to an older checkpoint" in "".join(raised.value.__notes__)
    assert len(calls) == 3 and all(c.parent.name == "20" for c in calls)  # never step 10
    assert _names(tmp_path) == ["10", "20"]


@pytest.mark.parametrize("error", [
    MemoryError,
    lambda: RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4.00GiB"),
    lambda: TypeError("a bug"),
], ids=["MemoryError", "device-oom", "bug"])
def test_other_read_errors_propagate_without_retry_or_fallback(tmp_path, monkeypatch, error):
    checkpointer = _saved(tmp_path, (10, 20))
    calls = _failing_reads(monkeypatch, error, times=100)
    with pytest.raises(type(error())) as raised:
        checkpointer.restore_latest(_abstract(), local_iterator(small_config()))
    checkpointer.close()
    assert len(calls) == 1 and "while restoring checkpoint" in "".join(raised.value.__notes__)
    assert _names(tmp_path) == ["10", "20"]


def test_a_state_of_another_config_is_a_checkpoint_error_not_corruption(tmp_path):
    checkpointer = _saved(tmp_path, (10, 20))
    other = dict(_abstract(), w=jax.ShapeDtypeStruct((2, 4), np.float32, sharding=_abstract()["w"].sharding))
    with pytest.raises(CheckpointError, match="does it belong to this config"):
        checkpointer.restore_latest(other, local_iterator(small_config()))
    checkpointer.close()
    assert _names(tmp_path) == ["10", "20"]


def _tensorstore_wrapped():
    try:
        raise ValueError('FAILED_PRECONDITION: Error reading "w/0.0": Truncated Zstd-compressed stream')
    except ValueError as err:
        try:
            raise Exception("Encountered error while reading array index") from err
        except Exception as outer:  # noqa: BLE001 - the error under test
            return outer


def _unpack_error():
    return pytest.importorskip("msgpack.exceptions").ExtraData(None, b"")


def _json_error():
    try:
        json.loads("\0" * 7)
    except json.JSONDecodeError as err:
        return err


class _HttpError(Exception):
    code = 429  # as gcsfs's and google-api-core's errors carry it


@pytest.mark.parametrize("error, fault", [
    (lambda: ConnectionError("reset"), "transient"),
    (lambda: OSError(110, "Connection timed out"), "transient"),  # ETIMEDOUT
    (lambda: _HttpError("rate limited"), "transient"),
    (lambda: ValueError("DEADLINE_EXCEEDED: reading gs://b/x"), "transient"),
    (lambda: FileNotFoundError("Requested directory for restore does not exist at /w/30/state."), "corrupt"),
    (_json_error, "corrupt"),
    (_unpack_error, "corrupt"),
    (lambda: ValueError("OUT_OF_RANGE: Requested byte range [0, 2291) is not valid for value of size 7"), "corrupt"),
    (lambda: ValueError("DATA_LOSS: Error decoding manifest"), "corrupt"),
    (_tensorstore_wrapped, "corrupt"),
    (MemoryError, "other"),
    (lambda: ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"), "other"),
    (lambda: ValueError("Requested shape: (2, 4) is not compatible with the stored shape: (2, 3)."), "other"),
    (lambda: OSError(13, "Permission denied"), "other"),
])
def test_restore_fault_tells_transient_corrupt_and_other_apart(error, fault):
    assert restore_fault(error()) == fault
