"""GatheredObserver: a step's observed queries under tensor parallelism.

Each rank holds some KV heads (and their query heads), so no rank alone can score a
policy's slots. Per layer, every rank computes its part of each observed sequence's
observation over its own heads (its policy's RankShare: summed or maximal attention, or
its queries, keys and values; rank_parts.py), and one gather brings the parts to rank 0,
which assembles the whole model's observation and hands it to the policies. Rank 0's
policies thus see exactly what a single rank would, and decide for every head;
compaction then applies each rank's rows of the masks (runtime/compaction.py).

    rank r:  parts over its heads ─┐  (cat over the observed sequences, one gather a layer)
    rank 0:  assemble(parts of every rank) ─► policy.observe(LayerObservation)

Every policy says how its observation combines (`KVPolicy.rank_share`), and runs
this way. Every rank sees the same `ObservedRows`, in the same order (rank 0 sends them
with the step), so the gathers line up. Layers may hold different numbers of slots
(PyramidKV): the rows carry each layer's shift.
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
from strata.kv.policies.rank_share import RankShare
from strata.kv.policies.runtime.compaction import read_slots
from strata.kv.policies.runtime.observer import ObservedSequence, observe
from strata.kv.policies.runtime.rank_parts import RankDims, assemble, local_part, part_size

FIELDS = 7  # ObservedRows as int64s, before its shifts (see encode)


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
    queries' rows in the flat batch, the slot of the first and the slots after the step
    in its longest layer, what each rank shares of it, and per layer how many slots
    fewer it holds than the longest (empty when none does)."""

    chunk: int
    first_row: int
    end_row: int
    first_slot: int
    num_slots: int
    share: RankShare = RankShare.SUMMED
    shifts: tuple[int, ...] = ()

    @classmethod
    def of(cls, seq: ObservedSequence, chunk: int) -> ObservedRows:
        first, num = max(seq.first_slot), max(seq.num_slots)
        shifts = tuple(first - f for f in seq.first_slot)
        return cls(chunk, seq.rows.start, seq.rows.stop, first, num, seq.share,
                   shifts if any(shifts) else ())  # fmt: skip

    def slots(self, layer: int) -> tuple[int, int]:
        """(slot of the first query, slots after the step) in `layer`."""
        shift = self.shifts[layer] if self.shifts else 0
        return self.first_slot - shift, self.num_slots - shift

    @staticmethod
    def encode(rows: list[ObservedRows]) -> np.ndarray:
        """[chunk, first row, end row, first slot, slots, share, layers, shifts[layers]]
        per row."""
        values: list[int] = []
        for r in rows:
            values += [r.chunk, r.first_row, r.end_row, r.first_slot, r.num_slots, int(r.share),
                       len(r.shifts), *r.shifts]  # fmt: skip
        return np.asarray(values, np.int64)

    @classmethod
    def decode(cls, data: np.ndarray) -> list[ObservedRows]:
        values, out, at = data.tolist(), [], 0
        while at < len(values):
            fixed = values[at : at + FIELDS]
            chunk, first_row, end_row, first_slot, num_slots, share, layers = fixed
            shifts = tuple(values[at + FIELDS : at + FIELDS + layers])
            rows = cls(chunk, first_row, end_row, first_slot, num_slots, RankShare(share), shifts)
            out.append(rows)
            at += FIELDS + layers
        return out


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
        KV heads among the model's, and policies, the sequences to hand the whole to."""
        self.cache, self.rows, self.comm, self.head_slices = cache, rows, comm, head_slices
        device = cache.k.device
        self.tables = [torch.tensor(tables[r.chunk], dtype=torch.long, device=device)
                       for r in rows]  # fmt: skip
        self.policies = policies or []
        self.faults: dict[str, SequenceFault] = {}  # by request id: policies that raised

    def __call__(self, layer: int, q: torch.Tensor, scale: float) -> None:
        """q: the step's queries [tokens, this rank's heads, head_dim], after RoPE."""
        dims = RankDims(self.cache.k.shape[3], q.shape[1], q.shape[2], self.head_slices)
        parts = [
            local_part(rows.share, self._local(layer, q, scale, rows, table))
            for rows, table in zip(self.rows, self.tables, strict=True)
        ]
        gathered = self.comm.gather_last_dim(torch.cat(parts))
        if self.comm.rank != 0:
            return
        gathered = gathered.view(self.comm.size, -1)
        at = 0
        for seq, rows, part in zip(self.policies, self.rows, parts, strict=True):
            first, n = rows.slots(layer)
            m = rows.end_row - rows.first_row
            assert len(part) == part_size(rows.share, m, n, dims), "ranks' parts differ"
            whole = assemble(rows.share, gathered[:, at : at + len(part)], m, n, dims, q.dtype)
            at += len(part)
            queries = q[seq.rows] if whole.queries is None else whole.queries
            slots = torch.arange(first, first + m, device=q.device)
            obs = LayerObservation(layer, queries, slots, _Gathered(whole.keys, whole.values), n,
                                   scale, summed=whole.summed, maxed=whole.maxed)  # fmt: skip
            observe(seq, obs, self.faults)

    def _local(
        self, layer: int, q: torch.Tensor, scale: float, rows: ObservedRows, table: torch.Tensor
    ) -> LayerObservation:
        """The sequence's observation over this rank's own heads."""
        queries = q[rows.first_row : rows.end_row]
        first, n = rows.slots(layer)
        slots = torch.arange(first, first + queries.shape[0], device=q.device)
        reader = partial(read_slots, self.cache, table)
        return LayerObservation(layer, queries, slots, reader, n, scale)


@dataclass(frozen=True)
class _Gathered:
    """Rank 0's reader of the keys and values every rank sent (RankShare.QUERIES_KV)."""

    keys: torch.Tensor | None
    values: torch.Tensor | None

    def __call__(self, layer: int, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None or self.values is None:
            raise RuntimeError(
                "under tensor parallelism this observation holds no keys or values: the "
                "policy's rank_share must be RankShare.QUERIES_KV for this step"
            )
        return self.keys[:num_slots], self.values[:num_slots]
