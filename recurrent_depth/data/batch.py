"""The batch contract between data and training: the keys of a model batch, the label that does not count, and
the conversion of packed rows into model inputs."""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100  # label value that does not count in the loss (as in the original)
BATCH_KEYS = ("inputs", "labels", "segment_ids", "positions")  # each [batch, seq] int32; the last two optional


class ToModelBatch:
    """Packed rows [batch, seq+1] -> {inputs, labels, segment_ids, positions} [batch, seq]; a label is IGNORE_INDEX
    where its token is padding, outside the loss mask (if given) or, with document masking, in another document."""

    def __init__(self, document_masking: bool):
        self.document_masking = document_masking

    def __call__(self, rows: dict) -> dict:
        tokens, segments, positions = rows["tokens"], rows["tokens_segment_ids"], rows["tokens_positions"]
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        seg_in, seg_out = segments[:, :-1], segments[:, 1:]
        keep = seg_out > 0  # padding never counts in the loss
        if "tokens_loss_mask" in rows:  # e.g. only the assistant's tokens of a conversation
            keep &= rows["tokens_loss_mask"][:, 1:]
        if self.document_masking:  # and no prediction across a document boundary
            keep &= seg_out == seg_in
            batch = {"segment_ids": seg_in, "positions": positions[:, :-1]}
        else:  # the original: attention across documents, positions run along the row; padding masked out
            batch = {"segment_ids": (seg_in > 0).astype(np.int32),
                     "positions": np.broadcast_to(np.arange(inputs.shape[1], dtype=np.int32), inputs.shape).copy()}
        return {"inputs": inputs.astype(np.int32), "labels": np.where(keep, labels, IGNORE_INDEX).astype(np.int32),
                **{k: v.astype(np.int32) for k, v in batch.items()}}
