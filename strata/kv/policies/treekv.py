"""TreeKV (He et al., 2025): smooth, tree-shaped compression, dense near the end.

The cache holds a fixed number of tokens per KV head. Each token that arrives past it
costs one eviction, decided in a two-token scope that sweeps the cache:

    ranks (position order)   0   1   2   3 ... k-1 | k (the new token)
    scope at cursor i            [i, i+1]            the lower average score goes
    then                     i <- i + 1; back to 0 when the scope would reach the new token

One sweep halves the region it passes over, and older tokens have been swept more
often, so the kept tokens thin out smoothly with distance, like the levels of a binary
tree: every token of the recent end, every other one a little further back, and so on.

Score: a token's attention averaged over the queries that could attend to it
(accumulated attention / (tokens computed - its position)), summed over each KV head's
query heads. Per KV head.

Prefill and decode share the rule. At the compression point the context's tokens are fed
through it in position order with the scores the context's queries gave (one scoring
pass, not a re-score per token); while decoding, each new token evicts one, and the
cursor carries over. The cursor depends only on the budget and the number of evictions,
so every layer and head sweeps in step.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from strata.kv.policies.base import KVView
from strata.kv.policies.scored import EveryQueryPolicy


def sweep(
    order: torch.Tensor, score: torch.Tensor, keep: int, cursor: int
) -> tuple[torch.Tensor, int]:
    """Feed slots through the pairwise rule.

    order: [rows, n] slots of each row in position order; score: [rows, n] per slot.
    Returns (the `keep` surviving slots of each row in position order, the next cursor)."""
    rows, n = order.shape
    cache = order[:, :keep]
    columns = torch.arange(keep + 1, device=order.device)
    for rank in range(keep, n):
        cache = torch.cat([cache, order[:, rank : rank + 1]], dim=1)
        if cursor + 1 >= keep:
            cursor = 0
        pair = cache[:, cursor : cursor + 2]
        pair_score = torch.gather(score, 1, pair)
        # the lower score goes; on a tie the older token (left of the pair) goes
        drop = cursor + (pair_score[:, 1] < pair_score[:, 0]).long()
        cache = cache[columns[None, :] != drop[:, None]].view(rows, keep)
        cursor += 1
    return cache, cursor


class TreeKVPolicy(EveryQueryPolicy):
    name = "treekv"
    evicts_during_decode = True
    cursor: int  # the pair scope's first rank, carried from one selection to the next

    def average_scores(self, view: KVView, layer: int) -> torch.Tensor:
        """[kv_heads, n]: accumulated attention over the number of queries that saw it."""
        total = self.layer_scores(view, layer)
        return total / (view.num_computed - view.positions(layer)).clamp_min(1)

    def select(self, view: KVView, keep: list[int]) -> list[torch.Tensor]:
        heads = self.shape.num_kv_heads
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for layer, k in enumerate(keep):
            groups[(view.num_slots(layer), k)].append(layer)
        masks: list[torch.Tensor] = [torch.empty(0)] * len(keep)
        next_cursor = self.cursor
        for (_, k), layers in groups.items():
            positions = torch.cat([view.positions(layer) for layer in layers])
            score = torch.cat([self.average_scores(view, layer) for layer in layers])
            order = torch.sort(positions, dim=-1, stable=True).indices
            kept, next_cursor = sweep(order, score, k, self.cursor)
            mask = torch.zeros(positions.shape, dtype=torch.bool, device=view.device)
            mask.scatter_(1, kept, True)
            for i, layer in enumerate(layers):
                masks[layer] = mask[i * heads : (i + 1) * heads]
        self.cursor = next_cursor
        return masks

    def reset(self) -> None:
        super().reset()
        self.cursor = 0
