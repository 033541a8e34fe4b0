"""The feed: input ids that the step in flight sampled, gathered on the device.

Under overlap scheduling (overlap.py) a sequence's newest token may still be PENDING on
the host when the next step is built. Its input row then holds 0 on the host, and after
the upload one gather writes the sampled token over it:

    ids[rows[i]] = max(sampled[sources[i]], 0)

(-1, the sampler's "no token allowed", becomes 0: that sequence ends when its token
reaches the host, and the row computed for it is dropped.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from strata.engine.overlap import PENDING, SampledStep
from strata.engine.sequence import Sequence


@dataclass
class FeedRows:
    """The flat-batch rows whose ids come from the feed, and their sampled rows."""

    rows: list[int] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)

    def add(self, feed: SampledStep | None, seq: Sequence, row: int) -> None:
        """Record `row` if it holds `seq`'s last token and that token is still PENDING."""
        if seq.token_ids[-1] != PENDING:
            return
        source = None if feed is None else feed.row(seq)
        if source is None:
            raise RuntimeError(f"{seq.request_id}: its last token is pending with no feed")
        self.rows.append(row)
        self.sources.append(source)

    def on(self, feed: SampledStep | None) -> FeedGather | None:
        if not self.rows:
            return None
        assert feed is not None
        return FeedGather(
            np.asarray(self.rows, np.int64), np.asarray(self.sources, np.int64), feed.tokens
        )


@dataclass(frozen=True)
class FeedGather:
    rows: np.ndarray  # [n] flat-batch rows
    sources: np.ndarray  # [n] rows of `tokens`
    tokens: torch.Tensor  # [sampled rows] the step in flight's tokens, on the device

    def apply(self, ids: torch.Tensor, rows: torch.Tensor, sources: torch.Tensor) -> None:
        """Write the fed tokens into `ids` (rows and sources: this gather's, uploaded)."""
        ids.index_copy_(0, rows, self.tokens.index_select(0, sources).clamp_min(0))
