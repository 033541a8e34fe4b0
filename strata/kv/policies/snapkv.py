"""SnapKV (Li et al., 2024): prompt tokens voted by an observation window, per KV head.

The last WINDOW tokens of the context are the observation window. Each window query's
attention over the context (softmax, causal) is summed over the window queries and over
the query heads of each KV head (GQA), smoothed with an average pool of KERNEL slots,
and each KV head keeps the window plus the best-scored other tokens. The window's
queries may fall in several prefill chunks: each chunk adds its share of the sums.
Compresses once, at the compression point; the cache grows while decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from strata.kv.policies.base import KVView
from strata.kv.policies.scored import ScoredPolicy


class SnapKVPolicy(ScoredPolicy):
    name = "snapkv"
    WINDOW = 64
    KERNEL = 5

    def window(self, context_len: int) -> int:
        return min(self.WINDOW, context_len)

    def first_observed_token(self, context_len: int) -> int:
        return context_len - self.window(context_len)

    def observed_queries(self, view: KVView, start: int, end: int) -> tuple[int, int] | None:
        c = view.context_len
        first, last = max(start, c - self.window(c)), min(end, c)
        return (first, last) if first < last else None

    def ranking(self, view: KVView, layer: int, k: int) -> torch.Tensor:
        """The window, then the pooled votes."""
        # Compression happens once, on an uncompressed cache: slot s holds token s, and
        # the window is the last slots.
        votes = self.layer_scores(view, layer)
        n = votes.shape[-1]
        before = n - self.window(view.context_len)
        pooled = votes[:, :before]  # a context no longer than the window has nothing to pool
        if before > 0:
            pooled = F.avg_pool1d(pooled[:, None], self.KERNEL, 1, self.KERNEL // 2)[:, 0]
        # The window outranks every vote, its newest first should k be below its size.
        window = 1e9 + torch.arange(n - before, device=view.device, dtype=torch.float32)
        return torch.cat([pooled, window.expand(votes.shape[0], -1)], dim=-1)
