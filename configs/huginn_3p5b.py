"""The released huginn-0125 shape and training recipe: 3.5B unique parameters, (2, 4, 2) layers, mean recurrence 32."""

import ml_collections

from recurrent_depth.config import base_config


def get_config() -> ml_collections.ConfigDict:
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
    config.train.update(steps=47360, batch_size=4096, seq_len=4096, log_every=1)
    config.train.optimizer.update(name="ellis_adam", peak_learning_rate=4e-5, schedule="constant",
                                  warmup_steps=4096, weight_decay=4e-5, b1=0.9, b2=0.95, eps=1e-6,
                                  grad_clip_norm=1.0)
    config.mesh.shape = (1, -1, 1)
    return config
