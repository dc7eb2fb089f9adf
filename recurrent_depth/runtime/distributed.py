"""Multi-process start-up: jax.distributed from a config section, the environment or cluster auto-detection."""

from __future__ import annotations

import os

import jax
import ml_collections


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """Starts jax.distributed for a multi-process run: from the config (the `distributed` section), from
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or auto-detected (TPU pods, SLURM) with
    `auto=True`."""
    address = config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        num = config.num_processes if config.num_processes is not None else int(os.environ["JAX_NUM_PROCESSES"])
        pid = config.process_id if config.process_id is not None else int(os.environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(address, num_processes=num, process_id=pid)
    elif config.auto:
        jax.distributed.initialize()
