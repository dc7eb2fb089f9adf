"""Packing documents into rows: a source's documents as an endless token stream, reshuffled every epoch, with row k
computed from k alone (so the iterator state is the step)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class PackedDocuments:
    """A source's rows: its documents packed into an endless stream, reshuffled each epoch; row k is tokens
    [k L, (k+1) L) of the stream (L = row_len), computed from k alone.  Rows are full (no padding); segment ids
    number the document pieces of a row and positions restart at 0 in each."""

    def __init__(self, docs: Sequence[np.ndarray], row_len: int, seed: Sequence[int]):
        self.lengths = np.array([len(d) for d in docs], np.int64)
        self.starts = np.cumsum(self.lengths) - self.lengths
        self.tokens = np.concatenate(docs)
        self.total, self.row_len, self.seed = int(self.lengths.sum()), row_len, tuple(seed)
        self._epochs = {}  # epoch -> (document order, cumulative lengths in that order); read by grain threads

    def _epoch(self, epoch: int):
        cached = self._epochs.get(epoch)
        if cached is None:
            order = np.random.default_rng([*self.seed, epoch]).permutation(len(self.lengths))
            cached = order, np.cumsum(self.lengths[order])
            if len(self._epochs) >= 4:
                self._epochs.clear()
            self._epochs[epoch] = cached
        return cached

    def row(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, segment ids, positions, loss mask) [row_len] of row k: one segment per document piece; every
        token is a target."""
        pieces = []
        pos, end = k * self.row_len, (k + 1) * self.row_len
        while pos < end:
            epoch, offset = divmod(pos, self.total)
            order, ends = self._epoch(epoch)
            i = int(np.searchsorted(ends, offset, side="right"))
            doc = order[i]
            inside = offset - (int(ends[i]) - int(self.lengths[doc]))
            n = min(int(self.lengths[doc]) - inside, end - pos)
            pieces.append(self.tokens[self.starts[doc] + inside:self.starts[doc] + inside + n])
            pos += n
        segments = np.concatenate([np.full(len(p), s, np.int32) for s, p in enumerate(pieces, 1)])
        positions = np.concatenate([np.arange(len(p), dtype=np.int32) for p in pieces])
        return np.concatenate(pieces), segments, positions, np.ones(self.row_len, bool)
