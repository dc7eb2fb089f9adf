"""train.py with the commit of one checkpoint held back, for tests/checkpoint/test_save_faults.py:

  python tests/save_fault_worker.py STEP MARKER RELEASE [train.py flags...]

Orbax writes an async checkpoint in a background thread and commits it last: locally by renaming the step's
`<step>.orbax-checkpoint-tmp` directory to `<step>` (AtomicRenameTemporaryPath), on GCS by writing
`<step>/commit_success.txt` (CommitFileTemporaryPath).  Here the commit of step STEP waits, its arrays and metadata
written: the worker writes MARKER (the uncommitted directory's path) and holds the commit until the file RELEASE
exists ("-": forever, until the test kills the process), then lets it go on ("-" for STEP: no step is held).
Training goes on meanwhile, as it does during a slow save, until the next save waits for this one.  The worker
prints `restored step N` (0: none) once the run has restored; its exit status is train.py's.
"""

import asyncio
import sys
from pathlib import Path

from orbax.checkpoint._src.path import atomicity

from recurrent_depth.checkpoint.train_state import TrainCheckpointer

ROOT = Path(__file__).parents[1]  # the repository: train.py


def hold_commit(step: int, marker: Path, release: Path | None) -> None:
    """Makes both of Orbax's commit kinds wait as described above, once, for `step`."""
    held = []

    def wrap(cls):
        real = cls.finalize

        async def finalize(self, *args, **kwargs):
            if self.get_final().name == str(step) and not held:
                held.append(step)
                marker.with_suffix(".tmp").write_text(str(self.get()))
                marker.with_suffix(".tmp").rename(marker)  # whole when the test sees it
                while release is None or not release.exists():
                    await asyncio.sleep(0.02)
            return await real(self, *args, **kwargs)

        cls.finalize = finalize

    wrap(atomicity.AtomicRenameTemporaryPath)
    wrap(atomicity.CommitFileTemporaryPath)


def report_restore() -> None:
    """Has the run print the step it restored."""
    real = TrainCheckpointer.restore_latest

    def restore_latest(self, *args, **kwargs):
        state = real(self, *args, **kwargs)
        print(f"restored step {0 if state is None else int(state.step)}", flush=True)
        return state

    TrainCheckpointer.restore_latest = restore_latest


def main(argv: list[str]) -> int:
    step, marker, release, *flags = argv
    if step != "-":
        hold_commit(int(step), Path(marker), None if release == "-" else Path(release))
    report_restore()
    sys.path.insert(0, str(ROOT))
    import train  # noqa: PLC0415 - after the patch, as a user runs it (train.py's main, its errors and status)

    return train.main(flags)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
