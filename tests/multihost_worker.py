"""One process of the two-process test (tests/test_multihost.py): a few sharded train steps and sharded
evaluation over 2 processes x 4 CPU devices; process 0 writes the results as JSON."""

import json
import sys
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 4)

from recurrent_depth.training import Trainer  # noqa: E402
from recurrent_depth.sharding import make_mesh  # noqa: E402
from helpers import eval_requests, local_iterator, run_steps, small_config  # noqa: E402


def train_steps() -> dict:
    config = small_config()
    losses, checksum = run_steps(Trainer(config, make_mesh((2, 2, 2))), local_iterator(config), steps=3)
    return {"losses": losses, "checksum": checksum}


def evaluate() -> dict:
    from recurrent_depth.evaluation.engine import Depth, EvalModel
    from recurrent_depth.hf import from_huggingface
    from recurrent_depth.shell_game import ShellGameTokenizer

    model, params = from_huggingface(Path(__file__).parent / "fixtures" / "huginn-tiny" / "checkpoint")
    lm = EvalModel(model, params, ShellGameTokenizer(), mesh=make_mesh((1, -1, 1)), batch_size=8, progress=False)
    requests, prompts = eval_requests()
    fixed, adaptive = lm.loglikelihood(requests, Depth(2)), lm.loglikelihood(requests, Depth(4, "kl", 1e-2))
    generated = lm.generate(prompts, Depth(3), max_new_tokens=4, stop_ids=[])
    return {"fixed": fixed.logprob.tolist(), "adaptive": adaptive.logprob.tolist(),
            "adaptive_steps": adaptive.steps.tolist(), "tokens": generated.tokens}


def main(port: int, process_id: int, out: str) -> None:
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    result = {"train": train_steps(), "eval": evaluate()}
    if jax.process_index() == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
