"""H2O (Zhang et al., 2023): heavy hitters by accumulated attention, plus a recent window.

Every query of the sequence, prompt and output alike, adds its attention (summed over
each KV head's query heads) to the scores of the slots it attends. A selection keeping
k tokens per KV head keeps the k // 2 most recent tokens and the k - k // 2 others with
the highest accumulated score. The cache is compressed at the compression point and then
held at its cap while decoding: every kv_evict_interval steps the lowest go.
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


class H2OPolicy(KVPolicy):
    name = "h2o"
    evicts_during_decode = True

    def __init__(self, shape: AttentionShape) -> None:
        super().__init__(shape)
        self.scores = SlotScores(shape.num_layers)

    def first_observed_token(self, context_len: int) -> int:
        return 0

    def observed_queries(self, view: KVView, start: int, end: int) -> tuple[int, int] | None:
        return (start, end)

    def observe(self, obs: LayerObservation) -> None:
        self.scores.add(obs.layer, obs.summed_attention())

    def select(self, view: KVView, keep: list[int]) -> list[torch.Tensor]:
        masks = []
        for layer, k in enumerate(keep):
            n = view.num_slots(layer)
            scores = self.scores.get(layer, n, self.shape.num_kv_heads, view.device)
            recent = keep_top(view.positions(layer), k // 2)
            masks.append(keep_top(torch.where(recent, float("inf"), scores), k))
        return masks

    def remap(self, compaction: Compaction) -> None:
        self.scores.remap(compaction)

    def reset(self) -> None:
        self.scores.clear()
