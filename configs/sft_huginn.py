"""Chat fine-tuning of huginn-0125 with the original's recipe (reference §2.9, `finetuning_simple_example.py`):

  python train.py --config=configs/sft_huginn.py:path/to/huginn-0125,chat.jsonl --workdir=runs/sft \\
      [--config.train.steps=N]

INIT_FROM is the Hugging Face directory (config.json, safetensors and tokenizer.json; `huginn-0125` by default),
DATA a JSONL glob of {"messages": [...]} or {"question", "answer"} rows (`chat.jsonl`): see
recurrent_depth.data.chat_rows.
Labels on the assistant's tokens only; the original's system prompt is the system turn of conversations without one
(`--config.data.chat.system_prompt=` for none). One epoch of GSM8K's 7473 training problems is 234 steps of 32.

Differences from the original: conversations are packed whole into rows with document masking (the original pads
each to 129 tokens; conversations of GSM8K's size fill a row each after truncation, so the steps are the same), and
the loss is the mean over all counted tokens of the global batch (the original averages its 16 micro-batches' means).
"""

from pathlib import Path

import ml_collections

from recurrent_depth.runtime.config_file import load_config_file

SYSTEM_PROMPT = "You are a helpful assistant that can assist users with mathematical reasoning."


def get_config(spec: str = "") -> ml_collections.ConfigDict:
    """`spec`: 'INIT_FROM[,DATA]' (defaults: 'huginn-0125' and 'chat.jsonl')."""
    init_from, _, data = spec.partition(",")
    config = load_config_file(Path(__file__).parent / "huginn_3p5b.py")  # the released shape, bf16 compute
    config.seed = 74
    config.train.init_from = init_from or "huginn-0125"
    config.data.kind = "chat"
    config.data.sources = ({"kind": "chat", "paths": data or "chat.jsonl", "weight": 1.0},)
    config.data.tokenizer.kind = "huggingface"
    config.data.tokenizer.path = config.train.get_ref("init_from")  # the checkpoint's tokenizer.json
    config.data.chat.update(system_prompt=SYSTEM_PROMPT, truncate=True)  # the original truncates to 129 tokens
    # Batch 32 of 128 tokens; the model's own depth sampler (poisson-lognormal, mean 32, 8 gradient iterations).
    # The original ran micro-batches of 2 on one GPU; raise train.microbatches if activations do not fit.
    config.train.update(steps=234, batch_size=32, seq_len=128, microbatches=1, log_every=1)
    steps = config.train.get_ref("steps")
    config.train.optimizer.update(name="adamw", peak_learning_rate=5e-7, weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8,
                                  schedule="wsd", grad_clip_norm=None)  # clipping effectively off in the original
    optimizer = config.train.optimizer
    optimizer.warmup_steps, optimizer.decay_steps = steps // 10, steps // 10  # follow --config.train.steps
    optimizer.end_learning_rate = optimizer.get_ref("peak_learning_rate") * 1e-3
    config.checkpoint.update(every=50, keep=2, keep_every=0)
    config.eval.update(every=0, tasks=())
    return config
