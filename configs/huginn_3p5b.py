"""The released huginn-0125 shape: 3.5B unique parameters, (2, 4, 2) layers, mean recurrence 32."""

import ml_collections

from recurrent_depth.config import model_config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = model_config_dict(
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
        dtype="bfloat16",
    )
    return config
