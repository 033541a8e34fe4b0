"""Counters of expert offloading: per-layer cache outcomes and prefetch accuracy.

Each (step, layer, expert with tokens) is one use, counted exactly once as:
    hit           resident at full precision (or low precision, if allowed) before the step
    prefetch_hit  resident because this step's cross-layer prefetch copied it
    miss          copied on demand (full or low precision: low_precision_loads counts those)
    cpu           computed on the CPU from host memory, nothing copied

Prefetch accuracy, over every (step, layer) that had a prediction:
    precision = |predicted ∩ used| / |predicted|,  recall = |predicted ∩ used| / |used|
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class LayerCounters:
    hits: int = 0
    prefetch_hits: int = 0
    misses: int = 0
    low_precision_loads: int = 0
    cpu: int = 0

    @property
    def uses(self) -> int:
        return self.hits + self.prefetch_hits + self.misses + self.cpu

    @property
    def hit_rate(self) -> float:
        """Uses served from a slot without a copy on the critical path."""
        return (self.hits + self.prefetch_hits) / self.uses if self.uses else 0.0


@dataclass
class OffloadCounters:
    layers: dict[int, LayerCounters] = field(default_factory=dict)
    predicted: int = 0
    used_with_prediction: int = 0
    correct: int = 0
    prefetch_loads: int = 0
    prefetch_bytes: int = 0

    def layer(self, layer: int) -> LayerCounters:
        if layer not in self.layers:
            self.layers[layer] = LayerCounters()
        return self.layers[layer]

    def record_prediction(self, predicted: Collection[int], used: Collection[int]) -> None:
        self.predicted += len(predicted)
        self.used_with_prediction += len(used)
        self.correct += len(set(predicted) & set(used))

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.correct / self.used_with_prediction if self.used_with_prediction else 0.0

    def total(self) -> LayerCounters:
        t = LayerCounters()
        for c in self.layers.values():
            t.hits += c.hits
            t.prefetch_hits += c.prefetch_hits
            t.misses += c.misses
            t.low_precision_loads += c.low_precision_loads
            t.cpu += c.cpu
        return t

    def totals(self) -> dict[str, int]:
        """Every counter by name: the layers' summed (`uses` too), then the prefetch ones."""
        t = self.total()
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "layers"}
        return {**asdict(t), "uses": t.uses, **own}

    def as_stats(self) -> dict[str, Any]:
        t = self.total()
        return {
            "moe_expert_uses": t.uses,
            "moe_expert_hits": t.hits,
            "moe_expert_prefetch_hits": t.prefetch_hits,
            "moe_expert_misses": t.misses,
            "moe_expert_low_precision_loads": t.low_precision_loads,
            "moe_experts_cpu_computed": t.cpu,
            "moe_expert_hit_rate": t.hit_rate,
            "moe_expert_hit_rate_per_layer": {
                layer: c.hit_rate for layer, c in sorted(self.layers.items())
            },
            "moe_prefetch_precision": self.precision,
            "moe_prefetch_recall": self.recall,
            "moe_prefetch_loads": self.prefetch_loads,
            "moe_prefetch_bytes": self.prefetch_bytes,
        }
