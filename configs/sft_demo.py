"""Chat fine-tuning of the demo model (`python train.py`'s ./workdir) on the shell game's chat variant, in a few CPU
minutes: the path from a checkpoint to a fine-tuned model end to end, without the 3.5B model.

  python -m recurrent_depth.cli.shell_game chat-data --output=shell_chat.jsonl
  python train.py --config=configs/sft_demo.py --workdir=workdir-sft    # [:INIT_FROM[,DATA]] after the file
  python eval.py --checkpoint=workdir-sft                                # chat and plain prompts, both splits

The conversations are `<s> User: ab cd bd </s> Assistant: d </s>`; only the assistant's cup and its `</s>` are
targets (data.chat.loss_tokens), so the model learns to answer the swaps of the user's turn after the header.
"""

from pathlib import Path

import ml_collections

from recurrent_depth.runtime.config_file import load_config_file

TRAIN_SWAPS = 16  # as in configs/demo.py


def get_config(spec: str = "") -> ml_collections.ConfigDict:
    """`spec`: 'INIT_FROM[,DATA]' (defaults: 'workdir', the demo's train.py output, and 'shell_chat.jsonl')."""
    init_from, _, data = spec.partition(",")
    config = load_config_file(Path(__file__).parent / "demo.py")  # the demo model's shape and evaluation depths
    config.train.init_from = init_from or "workdir"
    config.data.kind = "chat"
    config.data.sources = ({"kind": "chat", "paths": data or "shell_chat.jsonl", "weight": 1.0},)
    config.data.tokenizer.kind = "shell_game"  # its words include the plain template's role headers
    # Rows of 65 tokens hold about four conversations of 1-16 swaps (7-22 tokens each).
    config.train.update(steps=300, batch_size=32, seq_len=64, log_every=25)
    # The huginn recipe's shape (configs/sft_huginn.py) at a demo's learning rate: AdamW without weight decay,
    # warmup-stable-decay with 10% warmup and 10% cooldown to 1e-3 of the peak.
    steps = config.train.get_ref("steps")
    config.train.optimizer.update(name="adamw", peak_learning_rate=1e-3, weight_decay=0.0, schedule="wsd")
    optimizer = config.train.optimizer
    optimizer.warmup_steps, optimizer.decay_steps = steps // 10, steps // 10  # follow --config.train.steps
    optimizer.end_learning_rate = optimizer.get_ref("peak_learning_rate") * 1e-3
    config.checkpoint.update(every=100, keep=2)
    config.eval.update(tasks=tuple(
        f"shell:{lengths}:{'chat=true:' if chat else ''}name={lengths} swaps ({'chat' if chat else 'plain'})"
        for chat in (True, False) for lengths in (f"1-{TRAIN_SWAPS}", f"{TRAIN_SWAPS + 1}-{2 * TRAIN_SWAPS}")))
    return config
