"""StepObserver: hands each layer's queries to the policies that asked for them.

Built by the runner only for steps where some sequence's policy wants queries; the model
calls it once per layer after the step's K/V are written, so the cache read back by
`LayerObservation` includes the step's own tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from strata.kv.cache import KVCache
from strata.kv.compaction import read_slots
from strata.kv.policies.base import KVPolicy, LayerObservation


@dataclass(frozen=True)
class ObservedSequence:
    """One sequence's observed queries in the step's flat batch.

    rows: batch rows of the queries; first_slot[l]: slot of the first observed query in
    layer l; num_slots[l]: the layer's slots after the step; table: its block table."""

    policy: KVPolicy
    rows: slice
    first_slot: list[int]
    num_slots: list[int]
    table: torch.Tensor


class StepObserver:
    def __init__(self, cache: KVCache, sequences: list[ObservedSequence]) -> None:
        self.cache = cache
        self.sequences = sequences

    def __call__(self, layer: int, q: torch.Tensor, scale: float) -> None:
        """q: the step's queries [tokens, heads, head_dim], after RoPE."""
        for seq in self.sequences:
            queries = q[seq.rows]
            first = seq.first_slot[layer]
            slots = torch.arange(first, first + queries.shape[0], device=q.device)
            reader = partial(_read, self.cache, seq.table)
            obs = LayerObservation(layer, queries, slots, reader, seq.num_slots[layer], scale)
            seq.policy.observe(obs)


def _read(
    cache: KVCache, table: torch.Tensor, layer: int, num_slots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return read_slots(cache, table, layer, num_slots)
