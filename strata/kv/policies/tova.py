"""TOVA (Oren et al., 2024): keep the tokens the current query attends to most.

The score of a slot is the last query's attention to it, averaged over all heads of the
layer, so every KV head of a layer keeps the same tokens. At the compression point the
last context token's query ranks the context; while decoding, the query of each step
that evicts ranks the cache and the lowest tokens go, back down to the cap (one token
per step with kv_evict_interval=1, as the paper defines it).
"""

from __future__ import annotations

from strata.kv.policies.base import KVView
from strata.kv.policies.observation import LayerObservation
from strata.kv.policies.scored import ScoredPolicy


class TOVAPolicy(ScoredPolicy):
    name = "tova"
    evicts_during_decode = True

    def first_observed_token(self, context_len: int) -> int:
        return context_len - 1

    def observed_queries(self, view: KVView, start: int, end: int) -> tuple[int, int] | None:
        # the step's last query (the context's last, or a decode's), when a selection follows
        return (end - 1, end) if view.compacts_after(end) else None

    def observe(self, obs: LayerObservation) -> None:
        per_head = obs.summed_attention().sum(dim=0, keepdim=True) / self.shape.num_heads
        self.scores.set(obs.layer, per_head.expand(self.shape.num_kv_heads, -1))
