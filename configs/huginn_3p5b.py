"""The released huginn-0125 shape and training recipe: 3.5B unique parameters, (2, 4, 2) layers, mean recurrence 32.

  python train.py --config=configs/huginn_3p5b.py:parquet:gs://bucket/huginn-dataset --workdir=gs://bucket/run

The argument after the file names the pretraining data: `parquet:<directory or glob>` (the released dataset's
Parquet shards, 4097-token rows, documents at BOS 65504) or `array_record:<directory>` (a row store made by
`python -m recurrent_depth.cli.data prepare --seq_len=4096`, on a local or gcsfuse-mounted path); without it the
run needs data.sources set otherwise.  Neither has a held-out split, so the periodic held-out loss is off until
data.eval_sources and eval.every are set.
"""

import ml_collections

from recurrent_depth.training.config import base_config


def get_config(data: str = "") -> ml_collections.ConfigDict:
    config = base_config()
    config.model.update(
        vocab_size=65536,
        hidden_size=5280,
        num_heads=55,
        intermediate_size=17920,
        num_prelude_layers=2,
        num_core_layers=4,
        num_coda_layers=2,
        max_seq_len=4096,
        rope_base=50000.0,
        norm_eps=1e-6,
        mean_recurrence=32,
        mean_backprop_depth=8,
        dtype="bfloat16",  # bf16 compute, float32 master weights
    )
    # Reference §2.4-2.6: 4096 x 4096-token batches, lr 4e-5 with 4096 warmup steps then constant, clip 1.0.
    # Pod-sized intervals. A step is ~3.1e18 FLOP (16.8M tokens): ~17 s on 1024 v5p chips at 40% MFU, a minute on
    # 256. A log step drains the dispatch queue to fetch metrics, so log every 10 steps (minutes apart); a
    # checkpoint writes ~42 GB (float32 weights and two moments), so every 250 steps (~1-4 h: what a crash without
    # notice loses; preemption with SIGTERM saves at once), keeping every 5000th; the held-out loss at
    # r = 1..64 costs a few steps' compute, so every 1000 steps (it needs data.eval_sources; 0 turns it off).
    config.train.update(steps=47360, batch_size=4096, seq_len=4096, log_every=10)
    config.checkpoint.update(every=250, keep=3, keep_every=5000)
    config.eval.update(every=1000, batches=1)
    config.train.optimizer.update(name="ellis_adam", peak_learning_rate=4e-5, schedule="constant",
                                  warmup_steps=4096, weight_decay=4e-5, b1=0.9, b2=0.95, eps=1e-6,
                                  grad_clip_norm=1.0)
    config.mesh.shape = (1, -1, 1)
    if data:
        kind, _, paths = data.partition(":")
        if kind not in ("parquet", "array_record") or not paths:
            raise ValueError(f"the config argument must be parquet:<path> or array_record:<path>, got {data!r}")
        config.data.update(kind="mixture", sources=({"kind": kind, "paths": paths},))
        config.eval.every = 0
    return config
