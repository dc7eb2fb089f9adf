"""One process of the two-process test (tests/test_multihost.py), 2 processes x 4 CPU devices: `train` on mixture
data into a shared workdir (that the test then resumes in one process), an agreed restore from a copy of it whose
newest checkpoint only process 0 can read, and sharded evaluation; process 0 writes the results as JSON."""

import json
import shutil
import sys
import warnings
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 4)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from recurrent_depth.checkpoint.train_state import TrainCheckpointer  # noqa: E402
from recurrent_depth.runtime.sharding import make_mesh  # noqa: E402
from recurrent_depth.training.loop import train  # noqa: E402
from recurrent_depth.training.step import Trainer  # noqa: E402

from helpers import MULTIHOST_STEPS as STEPS  # noqa: E402
from helpers import eval_requests, local_iterator, mixture_run_config, params_checksum  # noqa: E402


def train_steps(corpus: Path) -> dict:
    """`train` of mixture_run_config(corpus) on a (2, 2, 2) mesh into corpus/run: its final parameters' checksum."""
    config = mixture_run_config(corpus)
    config.train.steps, config.mesh.shape = STEPS, (2, 2, 2)
    checksum = params_checksum(train(config, corpus / "run").params)
    if jax.process_index() == 0:  # the test resumes the run from here on while the processes go on
        (corpus / "trained").touch()
    return {"checksum": checksum}


def restore_agreed(corpus: Path) -> dict:
    """From a copy of corpus/run whose newest checkpoint has process 1's array files corrupted, both processes
    restore: [restored step, warned, failed here, newest step listed after it] of each process, and what the
    copy then holds beside its steps (the corrupt checkpoint moved aside)."""
    config = mixture_run_config(corpus)
    copy = corpus / "corrupt"
    if jax.process_index() == 0:
        shutil.copytree(corpus / "run" / "checkpoints", copy)
        corrupted = [f for f in (copy / str(STEPS) / "state").rglob("*")
                     if f.is_file() and "ocdbt.process_1" in str(f)]
        assert corrupted, sorted(map(str, (copy / str(STEPS)).rglob("*")))
        for f in corrupted:
            f.write_bytes(b"\0" * 7)
    multihost_utils.sync_global_devices("corrupted")
    checkpointer = TrainCheckpointer(copy, every=1, keep=10, async_save=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = checkpointer.restore_latest(Trainer(config, make_mesh((2, 2, 2))).abstract_state(),
                                            local_iterator(config))
    newest = max(checkpointer.manager.all_steps())
    checkpointer.close()
    messages = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    mine = np.asarray([int(state.step), bool(messages), any("on process" not in m for m in messages), newest],
                      np.int32)
    return {"restores": multihost_utils.process_allgather(mine).tolist(),
            "moved": sorted(p.name for p in copy.iterdir() if not p.name.isdigit())}


def evaluate() -> dict:
    from recurrent_depth.checkpoint.huggingface import from_huggingface
    from recurrent_depth.data.shell_game import ShellGameTokenizer
    from recurrent_depth.evaluation.engine import Depth, EvalModel

    model, params = from_huggingface(Path(__file__).parent / "fixtures" / "huginn-tiny" / "checkpoint")
    lm = EvalModel(model, params, ShellGameTokenizer(), mesh=make_mesh((1, -1, 1)), batch_size=8, progress=False)
    requests, prompts = eval_requests()
    fixed, adaptive = lm.loglikelihood(requests, Depth(2)), lm.loglikelihood(requests, Depth(4, "kl", 1e-2))
    generated = lm.generate(prompts, Depth(3), max_new_tokens=4, stop_ids=[])
    return {"fixed": fixed.logprob.tolist(), "adaptive": adaptive.logprob.tolist(),
            "adaptive_steps": adaptive.steps.tolist(), "tokens": generated.tokens}


def replica_batches(corpus: Path) -> dict:
    """The first global batch of mixture_run_config(corpus) on a mesh whose tensor axis spans both processes (every
    process holds every row) and on the (2, 2, 2) mesh, gathered: {mesh: {rows: [rows each process read], batch}}."""
    from recurrent_depth.data.pipeline import make_dataset

    config = mixture_run_config(corpus)
    result = {}
    for shape in ((1, 1, 8), (2, 2, 2)):
        trainer = Trainer(config, make_mesh(shape))
        local = next(iter(make_dataset(config.data, batch_size=config.train.batch_size, seq_len=config.train.seq_len,
                                       vocab_size=trainer.model_config.vocab_size, seed=config.seed,
                                       rows=trainer.batch_rows)))
        batch = trainer.global_batch(local)
        rows = multihost_utils.process_allgather(np.asarray(trainer.batch_rows + [-1] * 8)[:8])
        result[str(shape)] = {"rows": rows.tolist(), **{k: multihost_utils.process_allgather(v, tiled=True).tolist()
                                                          for k, v in batch.items()}}
    return result


def main(port: int, process_id: int, out: str, corpus: str) -> None:
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    result = {"replicas": replica_batches(Path(corpus)), "train": train_steps(Path(corpus)),
              "restore": restore_agreed(Path(corpus)), "eval": evaluate()}
    if jax.process_index() == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
