"""One process of the two-process test (tests/test_training.py): a few sharded train steps, results as JSON."""

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 4)

from recurrent_depth.training import Trainer  # noqa: E402
from recurrent_depth.sharding import make_mesh  # noqa: E402
from helpers import local_iterator, run_steps, small_config  # noqa: E402


def main(port: int, process_id: int, out: str) -> None:
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    config = small_config()
    trainer = Trainer(config, make_mesh((2, 2, 2)))
    losses, checksum = run_steps(trainer, local_iterator(config), steps=3)
    if jax.process_index() == 0:
        with open(out, "w") as f:
            json.dump({"losses": losses, "checksum": checksum}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
