"""A tiny recurrent-depth model for tests and CPU experiments (the huginn-tiny fixture's shape)."""

import ml_collections

from recurrent_depth.config import model_config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = model_config_dict(
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
    return config
