"""GatheredObserver: a step's observed queries under tensor parallelism.

Each rank holds some KV heads (and their query heads), so no rank alone can score a
policy's slots. Per layer, every rank computes each observed sequence's attention summed
over its own query heads ([its KV heads, slots]), and one gather brings the sums to rank
0, which adds them into the whole model's [KV heads, slots] and hands them to the
policies (`LayerObservation.summed`). Rank 0's policies thus see exactly the scores a
single rank would, and decide for every head; compaction then applies each rank's rows
of the masks (runtime/compaction.py).

    rank r:  sums over its heads ─┐  (cat over the observed sequences, one gather a layer)
    rank 0:  whole[heads of r] += part of r, for every r ─► policy.observe(summed=...)

Only policies whose scores are these sums (`KVPolicy.tensor_parallel`) run this way.
Every rank sees the same `ObservedRows`, in the same order (rank 0 sends them with the
step), so the gathers line up.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Protocol

import numpy as np
import torch

from strata.errors import SequenceFault
from strata.kv.cache import KVCache
from strata.kv.policies.observation import LayerObservation
from strata.kv.policies.runtime.compaction import read_slots
from strata.kv.policies.runtime.observer import ObservedSequence, observe

FIELDS = 5  # ObservedRows as int64s: chunk, first row, end row, first slot, slots


class ScoreGather(Protocol):
    """The ranks' gather (models/tp/comm.Communicator is one)."""

    rank: int
    size: int

    def gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor` concatenated on the last dim, in rank order, at rank 0."""
        ...


@dataclass(frozen=True)
class ObservedRows:
    """What every rank knows of one observed sequence: the step's chunk it is, its
    queries' rows in the flat batch, the slot of the first, and its slots after the
    step (the same in every layer: only layer-uniform policies run under TP)."""

    chunk: int
    first_row: int
    end_row: int
    first_slot: int
    num_slots: int

    @classmethod
    def of(cls, seq: ObservedSequence, chunk: int) -> ObservedRows:
        return cls(chunk, seq.rows.start, seq.rows.stop, seq.first_slot[0], seq.num_slots[0])

    @staticmethod
    def encode(rows: list[ObservedRows]) -> np.ndarray:
        values = [(r.chunk, r.first_row, r.end_row, r.first_slot, r.num_slots) for r in rows]
        return np.asarray(values, np.int64).reshape(-1)

    @classmethod
    def decode(cls, data: np.ndarray) -> list[ObservedRows]:
        return [cls(*(int(v) for v in row)) for row in data.reshape(-1, FIELDS)]


class GatheredObserver:
    def __init__(
        self,
        cache: KVCache,
        rows: list[ObservedRows],
        tables: list[list[int]],
        comm: ScoreGather,
        head_slices: list[slice],
        policies: list[ObservedSequence] | None = None,
    ) -> None:
        """tables: the step's block tables, by chunk. Rank 0 only: head_slices[r], rank r's
        KV heads among the model's, and policies, the sequences to hand the sums to."""
        self.cache, self.rows, self.comm, self.head_slices = cache, rows, comm, head_slices
        device = cache.k.device
        self.tables = [torch.tensor(tables[r.chunk], dtype=torch.long, device=device)
                       for r in rows]  # fmt: skip
        self.policies = policies or []
        self.faults: dict[str, SequenceFault] = {}  # by request id: policies that raised
        self.num_kv_heads = max((s.stop for s in head_slices), default=0)

    def __call__(self, layer: int, q: torch.Tensor, scale: float) -> None:
        """q: the step's queries [tokens, this rank's heads, head_dim], after RoPE."""
        sums = [
            self._local(layer, q, scale, rows, table)
            for rows, table in zip(self.rows, self.tables, strict=True)
        ]
        part = torch.cat(sums, dim=-1)  # [this rank's KV heads, slots of every sequence]
        gathered = self.comm.gather_last_dim(part)
        if self.comm.rank != 0:
            return
        whole = torch.zeros(self.num_kv_heads, part.shape[-1], device=part.device)
        for rank, heads in enumerate(self.head_slices):
            whole[heads] += gathered[:, rank * part.shape[-1] : (rank + 1) * part.shape[-1]]
        scores = whole.split([r.num_slots for r in self.rows], dim=-1)
        for seq, rows, summed in zip(self.policies, self.rows, scores, strict=True):
            slots = torch.arange(rows.first_slot, rows.first_slot + rows.end_row - rows.first_row,
                                 device=q.device)  # fmt: skip
            reader = partial(read_slots, self.cache, seq.table)
            obs = LayerObservation(layer, q[seq.rows], slots, reader, rows.num_slots, scale,
                                   summed=summed)  # fmt: skip
            observe(seq, obs, self.faults)

    def _local(
        self, layer: int, q: torch.Tensor, scale: float, rows: ObservedRows, table: torch.Tensor
    ) -> torch.Tensor:
        """[this rank's KV heads, slots]: the sequence's attention over its own heads."""
        queries = q[rows.first_row : rows.end_row]
        slots = torch.arange(rows.first_slot, rows.first_slot + queries.shape[0],
                             device=q.device)  # fmt: skip
        reader = partial(read_slots, self.cache, table)
        obs = LayerObservation(layer, queries, slots, reader, rows.num_slots, scale)
        return obs.summed_attention()
