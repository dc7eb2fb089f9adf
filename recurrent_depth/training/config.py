"""A run's config: every section with its defaults (`base_config`); the files in configs/ start from it.

  python train.py --config=configs/tiny.py --config.train.steps=500
"""

from __future__ import annotations

import ml_collections

from recurrent_depth.data.config import data_config
from recurrent_depth.model.config import model_config_dict
from recurrent_depth.runtime.sharding import DEFAULT_RULES


def base_config() -> ml_collections.ConfigDict:
    """Every section a run needs with its defaults; files in configs/ start from this and override fields."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = model_config_dict()

    config.train = train = ml_collections.ConfigDict()
    train.steps = 1000
    train.batch_size = 8  # global batch, sequences
    train.seq_len = 128
    train.microbatches = 1  # gradient accumulation: batch_size must be divisible by it
    train.log_every = 10
    train.z_loss = 0.0
    train.skip_nonfinite = True  # False: stop at the first non-finite gradient
    train.peak_flops = 0.0  # per device, for MFU/HFU; 0: the chip's bf16 peak (flops.PEAK_BF16_FLOPS), on CPU measured
    train.profile_steps = ""  # "first,end": a jax.profiler trace of steps first..end-1 into <workdir>/profile/
    train.init_from = ""  # start from these parameters (HF checkpoint, parameter checkpoint or workdir), not init
    train.depth = ml_collections.ConfigDict(
        {"kind": "poisson-lognormal", "sigma": 0.5, "n": ml_collections.config_dict.placeholder(int),
         "k": ml_collections.config_dict.placeholder(int)})
    train.optimizer = ml_collections.ConfigDict({
        "name": "ellis_adam",  # or "adamw"
        "peak_learning_rate": 4e-5,
        "schedule": "constant",  # constant (linear warmup then constant, the paper), cosine, wsd
        "warmup_steps": 100,
        "decay_steps": ml_collections.config_dict.placeholder(int),  # wsd only
        "end_learning_rate": 0.0,
        "weight_decay": 4e-5,
        "b1": 0.9,
        "b2": 0.95,
        "eps": 1e-6,
        "grad_clip_norm": 1.0,
        "moment_dtype": "float32",  # bfloat16 halves optimizer memory
    })

    config.mesh = ml_collections.ConfigDict()
    config.mesh.shape = (1, -1, 1)  # (data, fsdp, tensor); one size may be -1 = the rest of the devices
    config.mesh.rules = DEFAULT_RULES

    config.distributed = ml_collections.ConfigDict()
    config.distributed.coordinator_address = ml_collections.config_dict.placeholder(str)
    config.distributed.num_processes = ml_collections.config_dict.placeholder(int)
    config.distributed.process_id = ml_collections.config_dict.placeholder(int)
    config.distributed.auto = False  # True on TPU pods / SLURM: jax.distributed.initialize() detects the cluster

    config.data = data_config()

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every = 100  # steps between checkpoints (one is also written at the end and on SIGTERM)
    config.checkpoint.keep = 3  # newest checkpoints kept
    config.checkpoint.keep_every = 0  # also keep every N-th step's checkpoint forever (0: none)
    config.checkpoint.async_save = True

    config.eval = ml_collections.ConfigDict()
    config.eval.every = 0  # steps between held-out evaluations (0: never)
    config.eval.num_steps = (1, 4, 8, 16, 32, 64)  # recurrences evaluated, as the original did in training
    config.eval.batches = 4
    # What eval.py evaluates on this run's workdir when its flags do not say: task specs (see eval.py) and an
    # adaptive-exit criterion (None: fixed iteration counts only) with its threshold (None: the default).
    config.eval.tasks = ()
    config.eval.batch_size = 8  # sequences per evaluation batch
    config.eval.exit_criterion = ml_collections.config_dict.placeholder(str)
    config.eval.exit_threshold = ml_collections.config_dict.placeholder(float)
    return config
