"""The `data` section of a run config: its fields, defaults and what each means (the run's base_config holds it)."""

from __future__ import annotations

import ml_collections


def data_config() -> ml_collections.ConfigDict:
    """Defaults of the `data` config section."""
    config = ml_collections.ConfigDict()
    # 'synthetic' (a learnable sequence task for smoke tests), 'shell_game' (the demo's reasoning task, see
    # recurrent_depth.data.shell_game) or 'mixture' (of config.sources).
    config.kind = "synthetic"
    # Each source: {kind: text|jsonl|array_record, paths: glob or list, weight: float, text_field: 'text'}.
    config.sources = ()
    config.eval_sources = ()  # held-out sources for the periodic evaluation (generated tasks: another seed)
    config.tokenizer = ml_collections.ConfigDict({"kind": "sentencepiece", "path": ""})
    config.document_masking = True  # attention and targets stay within documents (the original has no masking)
    # Chat sources (data.kind='chat', or kind 'chat' in a mixture; see recurrent_depth.data.chat_rows).
    config.chat = ml_collections.ConfigDict({
        "system_prompt": "",  # the system turn of conversations without one ('': none)
        "loss_tokens": "assistant",  # which targets count: 'assistant' (its replies and turn ends) or 'all'
        "truncate": False,  # cut conversations longer than seq_len + 1 tokens (the original's recipe), not reject
        "skip_malformed": False,  # skip (and count, in a warning) malformed rows instead of raising
    })
    return config
