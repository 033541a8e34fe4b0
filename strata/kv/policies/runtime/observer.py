"""StepObserver: hands each layer's queries to the policies that asked for them.

Built (step_kv.py) only for steps where some sequence's policy wants queries; the model
calls it once per layer after the step's K/V are written, so the cache read back by
`LayerObservation` includes the step's own tokens.

Decode rows are scored together. A sequence that observes one query whose layers all
hold the same number of slots (H2O, TOVA and TreeKV while decoding) joins a batch: per
layer, one gather of every such sequence's keys (padded to the longest), one einsum and
one softmax, and each policy receives its row. That query is the sequence's newest slot,
so it attends to every cached slot: no causal mask beyond the padding. Other sequences
(prefill chunks, KVzip's passes, PyramidKV's uneven layers) are scored one by one.

A policy that raises while observing is recorded in `faults` and skipped for the rest of
the step; the other sequences' observations and the model run are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, partial

import torch

from strata.errors import SequenceFault, blame
from strata.kv.cache import KVCache
from strata.kv.policies.base import KVPolicy
from strata.kv.policies.observation import LayerObservation
from strata.kv.policies.rank_share import RankShare
from strata.kv.policies.runtime.compaction import read_slots


@dataclass(frozen=True)
class ObservedSequence:
    """One sequence's observed queries in the step's flat batch.

    rows: batch rows of the queries; first_slot[l]: slot of the first observed query in
    layer l; num_slots[l]: the layer's slots after the step; table: its block table;
    share: what each rank sends under tensor parallelism (KVPolicy.rank_share)."""

    request_id: str
    policy: KVPolicy
    rows: slice
    first_slot: list[int]
    num_slots: list[int]
    table: torch.Tensor
    share: RankShare = RankShare.SUMMED

    @property
    def single_uniform(self) -> bool:
        """One observed query, and every layer holds the same number of slots."""
        return self.rows.stop - self.rows.start == 1 and len(set(self.num_slots)) == 1


class DecodeBatch:
    """The single-query sequences of a step, scored together (see the module docstring)."""

    ROWS_PER_GROUP = 1 << 16  # sequences x padded slots per einsum: bounds temporary memory

    def __init__(
        self,
        cache: KVCache,
        sequences: list[ObservedSequence],
        faults: dict[str, SequenceFault],
    ) -> None:
        self.cache = cache
        self.sequences = sequences
        self.faults = faults
        self.lengths = [s.num_slots[0] for s in sequences]
        self.rows = [s.rows.start for s in sequences]

    @cached_property
    def _index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(physical slot [B, n_max], valid [B, n_max], query rows [B], query slots [B])."""
        device = self.cache.k.device
        bs = self.cache.block_size
        tables = torch.nn.utils.rnn.pad_sequence([s.table for s in self.sequences], True)
        slots = torch.arange(max(self.lengths), device=device)
        phys = tables[:, slots // bs] * bs + slots % bs
        lengths = torch.tensor(self.lengths, device=device)
        rows = torch.tensor(self.rows, device=device)
        return phys, slots[None, :] < lengths[:, None], rows, lengths - 1

    def observe(self, layer: int, q: torch.Tensor, scale: float) -> None:
        phys, valid, rows, query_slots = self._index
        pool_k = self.cache.k[layer].view(-1, *self.cache.k.shape[3:])  # [slots, kvh, d]
        kv_heads, dim = pool_k.shape[1], pool_k.shape[2]
        n_max = phys.shape[1]
        per_group = max(1, self.ROWS_PER_GROUP // n_max)
        for a in range(0, len(self.sequences), per_group):
            b = min(a + per_group, len(self.sequences))
            keys = pool_k[phys[a:b]].float()  # [B, n, kvh, d]
            queries = q[rows[a:b]].float().view(b - a, kv_heads, -1, dim)  # [B, kvh, g, d]
            logits = torch.einsum("bhgd,bnhd->bhgn", queries, keys) * scale
            logits.masked_fill_(~valid[a:b, None, None, :], float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            for i in range(a, b):
                seq, n = self.sequences[i], self.lengths[i]
                obs = LayerObservation(
                    layer, q[seq.rows], query_slots[i : i + 1],
                    partial(read_slots, self.cache, seq.table), n, scale,
                    probs=probs[i - a, :, :, None, :n],
                )  # fmt: skip
                observe(seq, obs, self.faults)


def observe(seq: ObservedSequence, obs: LayerObservation, faults: dict[str, SequenceFault]) -> None:
    """Hand one layer's observation to the sequence's policy. A policy that raises is
    recorded in `faults` (its request fails after the step) and asked nothing more."""
    if seq.request_id in faults:
        return
    try:
        with blame(seq.request_id):
            seq.policy.observe(obs)
    except SequenceFault as fault:
        faults[seq.request_id] = fault


class StepObserver:
    def __init__(self, cache: KVCache, sequences: list[ObservedSequence]) -> None:
        self.cache = cache
        self.faults: dict[str, SequenceFault] = {}  # by request id: policies that raised
        self.observed = sequences  # in the step's order
        batched = [s for s in sequences if s.single_uniform]
        if len(batched) < 2:
            batched = []
        self.batch = DecodeBatch(cache, batched, self.faults) if batched else None
        self.sequences = [s for s in sequences if not (batched and s.single_uniform)]

    def __call__(self, layer: int, q: torch.Tensor, scale: float) -> None:
        """q: the step's queries [tokens, heads, head_dim], after RoPE."""
        if self.batch is not None:
            self.batch.observe(layer, q, scale)
        for seq in self.sequences:
            queries = q[seq.rows]
            first = seq.first_slot[layer]
            slots = torch.arange(first, first + queries.shape[0], device=q.device)
            reader = partial(read_slots, self.cache, seq.table)
            obs = LayerObservation(layer, queries, slots, reader, seq.num_slots[layer], scale)
            observe(seq, obs, self.faults)
