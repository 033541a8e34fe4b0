"""ScoredPolicy: the base of the policies that rank slots by scores from observed attention
(H2O, TOVA, SnapKV, ChunkKV, PyramidKV, TreeKV, Expected Attention, KVzip).

The scores live in `SlotScores`: per layer a [kv_heads, n] vector over slots that grows
with the cache, follows every compaction (`remap`) and is cleared on preemption
(`reset`). By default a scored policy adds each observed layer's summed attention to its
scores and keeps, per layer and KV head, the k best of its `ranking`.
"""

from __future__ import annotations

import torch

from strata.kv.policies.base import AttentionShape, Compaction, KVPolicy, KVView, keep_top
from strata.kv.policies.observation import LayerObservation


class SlotScores:
    """Per-layer score vectors over slots, [kv_heads, n_l], that grow with the cache and
    follow compaction. `add` pads a shorter stored vector with zeros."""

    def __init__(self, num_layers: int) -> None:
        self.layers: list[torch.Tensor | None] = [None] * num_layers

    def add(self, layer: int, scores: torch.Tensor) -> None:
        old = self.layers[layer]
        if old is None:
            self.layers[layer] = scores.clone()
            return
        if old.shape[-1] < scores.shape[-1]:
            old = torch.nn.functional.pad(old, (0, scores.shape[-1] - old.shape[-1]))
        old[..., : scores.shape[-1]] += scores
        self.layers[layer] = old

    def set(self, layer: int, scores: torch.Tensor) -> None:
        self.layers[layer] = scores.clone()

    def get(self, layer: int, num_slots: int, kv_heads: int, device: torch.device) -> torch.Tensor:
        """[kv_heads, num_slots]: the stored scores, zero for slots never scored."""
        out = torch.zeros(kv_heads, num_slots, device=device)
        stored = self.layers[layer]
        if stored is not None:
            n = min(num_slots, stored.shape[-1])
            out[:, :n] = stored[:, :n]
        return out

    def remap(self, compaction: Compaction) -> None:
        for layer, index in enumerate(compaction.new_to_old):
            stored = self.layers[layer]
            if stored is None:
                continue
            missing = compaction.old_num_slots[layer] - stored.shape[-1]
            if missing > 0:
                stored = torch.nn.functional.pad(stored, (0, missing))
            self.layers[layer] = torch.gather(stored, -1, index)

    def clear(self) -> None:
        self.layers = [None] * len(self.layers)


class ScoredPolicy(KVPolicy):
    """A policy that keeps the slots its scores rank highest. See the module docstring."""

    def __init__(self, shape: AttentionShape) -> None:
        super().__init__(shape)
        self.scores = SlotScores(shape.num_layers)
        self.reset()

    def layer_scores(self, view: KVView, layer: int) -> torch.Tensor:
        """[kv_heads, num_slots(layer)] float32: the scores, zero for slots never scored."""
        return self.scores.get(layer, view.num_slots(layer), self.shape.num_kv_heads, view.device)

    def ranking(self, view: KVView, layer: int, k: int) -> torch.Tensor:
        """[kv_heads, num_slots(layer)]: `select` keeps the k highest of each row (ties to
        the lower slot). Default: the scores."""
        return self.layer_scores(view, layer)

    def observe(self, obs: LayerObservation) -> None:
        self.scores.add(obs.layer, obs.summed_attention())

    def select(self, view: KVView, keep: list[int]) -> list[torch.Tensor]:
        return [keep_top(self.ranking(view, layer, k), k) for layer, k in enumerate(keep)]

    def remap(self, compaction: Compaction) -> None:
        self.scores.remap(compaction)

    def reset(self) -> None:
        """Forget the scores; a subclass resets its own state here too (called by
        __init__)."""
        self.scores.clear()


class EveryQueryPolicy(ScoredPolicy):
    """Scores from every query of the sequence, prompt and output alike (H2O, TreeKV): a
    prefix-cache hit may skip none of them."""

    def first_observed_token(self, context_len: int) -> int:
        return 0

    def observed_queries(self, view: KVView, start: int, end: int) -> tuple[int, int] | None:
        return (start, end)
