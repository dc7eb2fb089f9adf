"""A tiny recurrent-depth model for tests and CPU experiments (the huginn-tiny fixture's shape)."""

import ml_collections

from recurrent_depth.training.config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model.update(
        vocab_size=512,
        hidden_size=64,
        num_heads=4,
        intermediate_size=96,
        num_prelude_layers=2,
        num_core_layers=2,
        num_coda_layers=1,
        max_seq_len=128,
        mean_recurrence=8,
        mean_backprop_depth=2,
    )
    config.train.update(steps=200, batch_size=8, seq_len=64, log_every=10)
    config.train.optimizer.update(peak_learning_rate=3e-3, warmup_steps=20, weight_decay=1e-4)
    return config
