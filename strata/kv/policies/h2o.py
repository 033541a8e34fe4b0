"""H2O (Zhang et al., 2023): heavy hitters by accumulated attention, plus a recent window.

Every query of the sequence, prompt and output alike, adds its attention (summed over
each KV head's query heads) to the scores of the slots it attends. A selection keeping
k tokens per KV head keeps the k // 2 most recent tokens and the k - k // 2 others with
the highest accumulated score. The cache is compressed at the compression point and then
held at its cap while decoding: every kv_evict_interval steps the lowest go.
"""

from __future__ import annotations

import torch

from strata.kv.policies.base import KVView, keep_top
from strata.kv.policies.scored import EveryQueryPolicy


class H2OPolicy(EveryQueryPolicy):
    name = "h2o"
    evicts_during_decode = True

    def ranking(self, view: KVView, layer: int, k: int) -> torch.Tensor:
        recent = keep_top(view.positions(layer), k // 2)
        return torch.where(recent, float("inf"), self.layer_scores(view, layer))
