"""The `data` section of a run config: its fields, defaults and what each means (the run's base_config holds it)."""

from __future__ import annotations

import ml_collections

SOURCE_KINDS = ("text", "jsonl", "chat", "array_record", "parquet")
# The fields a source of each kind may have besides {kind, paths, weight}.
SOURCE_FIELDS = {
    "text": ("text_field",), "jsonl": ("text_field",), "chat": (), "array_record": (),
    "parquet": ("column", "row_length", "bos_id"),
}


def data_config() -> ml_collections.ConfigDict:
    """Defaults of the `data` config section."""
    config = ml_collections.ConfigDict()
    # 'synthetic' (a learnable sequence task for smoke tests), 'shell_game' (the demo's reasoning task, see
    # recurrent_depth.data.shell_game) or 'mixture' (of config.sources).
    config.kind = "synthetic"
    # Each source: {kind, paths: glob or list, weight: 1.0, ...}; kinds:
    #   text (documents separated by blank lines), jsonl ({text_field: 'text'} per line): tokenized at start-up
    #   chat: conversations (recurrent_depth.data.chat_rows)
    #   array_record: a row store made by `python -m recurrent_depth.cli.data prepare` (paths: its directory)
    #   parquet: token rows (the released Huginn dataset): {column: 'input_ids', row_length: 4097, bos_id: -1
    #     (data.tokenizer's BOS, or huginn-0125's 65504 without one)}
    config.sources = ()
    config.eval_sources = ()  # held-out sources for the periodic evaluation (generated tasks: another seed)
    config.tokenizer = ml_collections.ConfigDict({"kind": "sentencepiece", "path": ""})
    config.read_threads = 4  # threads reading and decoding rows ahead of the device
    config.document_masking = True  # attention and targets stay within documents (the original has no masking)
    # Chat sources (data.kind='chat', or kind 'chat' in a mixture; see recurrent_depth.data.chat_rows).
    config.chat = ml_collections.ConfigDict({
        "system_prompt": "",  # the system turn of conversations without one ('': none)
        "loss_tokens": "assistant",  # which targets count: 'assistant' (its replies and turn ends) or 'all'
        "truncate": False,  # cut conversations longer than seq_len + 1 tokens (the original's recipe), not reject
        "skip_malformed": False,  # skip (and count, in a warning) malformed rows instead of raising
    })
    return config
