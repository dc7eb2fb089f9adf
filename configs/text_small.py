"""A small recurrent-depth language model of Python source: the standard library's code (recurrent_depth.data.corpus)
with a 4096-piece SentencePiece tokenizer, about 15 minutes on two CPU cores.

  python -m recurrent_depth.cli.corpus stdlib --output=corpus/stdlib
  python train.py --config=configs/text_small.py --workdir=runs/text_small

The corpus directory is `corpus/stdlib` (relative to the working directory) unless given after a colon:
`--config=configs/text_small.py:/data/stdlib`. Training follows the paper's recipe (randomized depth, mean 6 here,
gradients through the last 3 iterations); `python eval.py --checkpoint=runs/text_small` then reports held-out
perplexity at each iteration count.
"""

import ml_collections

from recurrent_depth.data.corpus import DEFAULT_VOCAB_SIZE, TOKENIZER_FILE, TRAIN_FILE, VALID_FILE
from recurrent_depth.training.config import base_config

CORPUS_DIR = "corpus/stdlib"


def get_config(corpus_dir: str = CORPUS_DIR) -> ml_collections.ConfigDict:
    corpus_dir = (corpus_dir or CORPUS_DIR).rstrip("/")
    config = base_config()
    config.model.update(
        vocab_size=DEFAULT_VOCAB_SIZE,
        hidden_size=128,
        num_heads=4,
        intermediate_size=384,
        num_prelude_layers=1,
        num_core_layers=2,
        num_coda_layers=1,
        max_seq_len=256,  # room for a prompt plus 128 new tokens at generation
        mean_recurrence=6,
        mean_backprop_depth=3,
    )
    config.data.update(kind="mixture", sources=({"kind": "jsonl", "paths": f"{corpus_dir}/{TRAIN_FILE}"},),
                       eval_sources=({"kind": "jsonl", "paths": f"{corpus_dir}/{VALID_FILE}"},))
    config.data.tokenizer.update(kind="sentencepiece", path=f"{corpus_dir}/{TOKENIZER_FILE}")
    # 600 steps of 8 x 256 tokens (1.2M tokens, about a third of the corpus).
    config.train.update(steps=600, batch_size=8, seq_len=256, log_every=25)
    config.train.optimizer.update(name="adamw", peak_learning_rate=3e-3, schedule="cosine", warmup_steps=50,
                                  weight_decay=0.01)
    config.mesh.shape = (1, 1, 1)  # one CPU device: no sharding to pay for
    config.checkpoint.update(every=200, keep=3)
    # Held-out loss at several iteration counts during training, and what eval.py evaluates by default.
    config.eval.update(every=300, batches=2, num_steps=(1, 4, 8, 16, 32), batch_size=8,
                       tasks=(f"ppl:{corpus_dir}/{VALID_FILE}:limit=8:name=stdlib held out",))
    return config
