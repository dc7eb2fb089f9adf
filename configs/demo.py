"""The default of `python train.py`: a small recurrent-depth model learns the shell game
(recurrent_depth.data.shell_game) on two CPU cores in about 15 minutes; `python eval.py` then shows accuracy rising
with test-time iterations, also on sequences longer than any it trained on.

Training follows the paper's recipe at small scale: the iteration count is drawn per step from the log-normal
Poisson distribution (mean 8 here, 32 in the paper) and gradients flow through the last 4 iterations only (8 in
the paper).
"""

import ml_collections

from recurrent_depth.training.config import base_config

TRAIN_SWAPS = 16  # swaps per training row; every prefix is a target, so lengths 1-16 are trained


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model.update(
        vocab_size=32,  # the shell game has 18 tokens
        hidden_size=64,
        num_heads=4,
        intermediate_size=256,
        num_prelude_layers=1,
        num_core_layers=2,
        num_coda_layers=1,
        max_seq_len=64,
        mean_recurrence=8,
        mean_backprop_depth=4,
    )
    config.data.kind = "shell_game"
    config.data.tokenizer.kind = "shell_game"
    config.train.update(steps=5000, batch_size=64, seq_len=TRAIN_SWAPS + 1, log_every=100)
    config.train.optimizer.update(name="adamw", peak_learning_rate=2e-3, schedule="cosine", warmup_steps=200,
                                  weight_decay=0.01)
    config.mesh.shape = (1, 1, 1)  # one CPU device: no sharding to pay for
    config.checkpoint.update(every=1000, keep=2)
    # Held-out problems: lengths trained on, and longer ones never seen in training.
    config.eval.update(num_steps=(1, 2, 4, 8, 16, 32), exit_criterion="kl", batch_size=64,
                       tasks=(f"shell:1-{TRAIN_SWAPS}:name=1-{TRAIN_SWAPS} swaps (trained)",
                              f"shell:{TRAIN_SWAPS + 1}-{2 * TRAIN_SWAPS}:name={TRAIN_SWAPS + 1}-{2 * TRAIN_SWAPS} "
                              "swaps (longer)"))
    return config
