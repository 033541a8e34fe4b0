"""TOVA (Oren et al., 2024): keep the tokens the current query attends to most.

The score of a slot is the last query's attention to it, averaged over all heads of the
layer, so every KV head of a layer keeps the same tokens. At the compression point the
last context token's query ranks the context; while decoding, the query of each step
that evicts ranks the cache and the lowest tokens go, back down to the cap (one token
per step with kv_evict_interval=1, as the paper defines it).
"""

from __future__ import annotations

import torch

from strata.kv.policies.base import (
    AttentionShape,
    Compaction,
    KVPolicy,
    KVView,
    LayerObservation,
    SlotScores,
    keep_top,
)


class TOVAPolicy(KVPolicy):
    name = "tova"
    evicts_during_decode = True

    def __init__(self, shape: AttentionShape) -> None:
        super().__init__(shape)
        self.scores = SlotScores(shape.num_layers)

    def first_observed_token(self, context_len: int) -> int:
        return context_len - 1

    def observed_queries(self, view: KVView, start: int, end: int) -> tuple[int, int] | None:
        # the step's last query (the context's last, or a decode's), when a selection follows
        return (end - 1, end) if view.compacts_after(end) else None

    def observe(self, obs: LayerObservation) -> None:
        per_head = obs.summed_attention().sum(dim=0, keepdim=True) / self.shape.num_heads
        self.scores.set(obs.layer, per_head.expand(self.shape.num_kv_heads, -1))

    def select(self, view: KVView, keep: list[int]) -> list[torch.Tensor]:
        return [
            keep_top(self.scores.get(layer, view.num_slots(layer), self.shape.num_kv_heads,
                                     view.device), k)
            for layer, k in enumerate(keep)
        ]  # fmt: skip

    def remap(self, compaction: Compaction) -> None:
        self.scores.remap(compaction)

    def reset(self) -> None:
        self.scores.clear()
