"""Replayed routing with controlled locality, for the expert offloading benchmark.

Random routers spread tokens evenly over the experts; real MoE models reuse experts
across adjacent tokens. `TraceRouting` wraps a RoutedExperts and replaces each layer's
top-k ids by a synthetic trace: for decode row t (one sequence), each of its k experts
is kept from the previous step with probability `locality`, else drawn uniformly from
the experts the row does not already use. locality 0 is uniform routing; 1 never changes.
The router's weights are kept. Prefill steps (more rows than the batch) draw uniformly.
"""

from __future__ import annotations

import random

import torch

from strata.models.routed_experts import RoutedExperts


class TraceRouting:
    def __init__(
        self, inner: RoutedExperts, num_experts: int, locality: float, seed: int = 0
    ) -> None:
        if not 0.0 <= locality <= 1.0:
            raise ValueError(f"locality must be in [0, 1], got {locality}")
        self.inner = inner
        self.num_experts = num_experts
        self.locality = locality
        self._rng = random.Random(seed)
        self._last: dict[tuple[int, int], list[int]] = {}  # (layer, row) -> experts

    def prefetch(self, layer: int, x: torch.Tensor) -> None:
        self.inner.prefetch(layer, x)

    def forward(
        self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        rows, k = topk_ids.shape
        ids = [self._row(layer, t, k) for t in range(rows)]
        traced = torch.tensor(ids, dtype=topk_ids.dtype).to(topk_ids.device, non_blocking=True)
        return self.inner.forward(layer, x, traced, topk_weights)

    def _row(self, layer: int, row: int, k: int) -> list[int]:
        prev = self._last.get((layer, row))
        chosen: list[int] = []
        for j in range(k):
            if prev is not None and self._rng.random() < self.locality and prev[j] not in chosen:
                chosen.append(prev[j])
            else:
                pool = [e for e in range(self.num_experts) if e not in chosen]
                chosen.append(self._rng.choice(pool))
        self._last[(layer, row)] = chosen
        return chosen
