"""KVStepBuilder: what attention needs of the KV policies for one step (the runner's one call).

A sequence under a policy holds fewer KV slots than computed tokens, so a chunk's tokens
go to slots from `first_slot` on while RoPE still uses their token positions:

    chunk tokens   [start, end)            positions (RoPE), as without a policy
    chunk slots    [first, first + n)      first = start - tokens evicted (longest layer)

Layers may attend over different KV, and then each layer gets its own slot mapping and
layout (`StepKV.layer_layouts`):
- layers with their own budgets (PyramidKV) hold fewer slots than the longest: their
  chunk goes `shift` slots lower, with the same block table;
- a policy may name the blocks a layer attends over (`KVPolicy.attended_blocks`): that
  layer's table and context length are the policy's, its slots the sequence's own.
Layers alike in every chunk share one layout. A policy that raises for a chunk raises
errors.SequenceFault naming its request, before anything is computed: the runner leaves
that chunk out and builds again. Without any policy in the step the builder
only maps slots: slot == token position.

Recall sequences (strata/kv/recall) hold no pool blocks: their chunks are left out of
the slots and layouts, and planned by their own store (`StepKV.recall`, with
`ordinary_rows` the flat-batch rows of the other chunks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from strata.attention.backend import AttentionBackend, BatchLayout, StepMetadata
from strata.errors import blame
from strata.kv.cache import KVCache
from strata.kv.policies.attended import AttendedBlocks, ChunkSlots
from strata.kv.policies.runtime.interfaces import PolicyChunk, PolicyStep
from strata.kv.policies.runtime.observer import ObservedSequence, StepObserver
from strata.kv.recall.attention import RecallRows, ordinary_rows


@dataclass(frozen=True)
class LayerLayout:
    """One layer's view of the step: where its tokens are written and what it attends."""

    slot_mapping: np.ndarray  # [tokens] int64 physical slots
    layout: BatchLayout


@dataclass(frozen=True)
class StepKV:
    """slot_mapping/layout: the step over each sequence's own table and longest layer.
    layer_layouts/layer_of: when layers differ, layer i uses layer_layouts[layer_of[i]]
    (both empty when every layer uses slot_mapping/layout). observer: for the model to
    call per layer, when a policy wants queries."""

    slot_mapping: np.ndarray
    layout: BatchLayout
    layer_layouts: list[LayerLayout] = field(default_factory=list)
    layer_of: list[int] = field(default_factory=list)
    observer: StepObserver | None = None
    recall: tuple[RecallRows, ...] = ()
    ordinary_rows: np.ndarray | None = None  # [ordinary tokens], set when recall is not empty

    @property
    def uniform(self) -> bool:
        return not self.layer_of


def layer_metadata(
    backend: AttentionBackend[Any], parts: Sequence[LayerLayout], layer_of: Sequence[int],
    device: torch.device,
) -> StepMetadata:  # fmt: skip
    """The backend's metadata for a step whose layers differ: layer i over parts[layer_of[i]]
    (rank 0 and every tensor-parallel worker build it alike)."""
    geometries = [
        (part.layout, torch.from_numpy(part.slot_mapping).to(device, non_blocking=True))
        for part in parts
    ]
    return backend.prepare_layers(geometries, layer_of, device)


def first_slot(chunk: PolicyChunk) -> int:
    """The slot of the chunk's first token in the sequence's longest layer."""
    kv = chunk.seq.kv
    return chunk.start if kv is None else chunk.start - min(kv.evicted)


def chunk_slots(table: list[int], first: int, num_tokens: int, block_size: int) -> np.ndarray:
    """Physical slots of `num_tokens` tokens from slot `first` of a block table."""
    slots = np.arange(first, first + num_tokens, dtype=np.int64)
    blocks = np.asarray(table[: -(-(first + num_tokens) // block_size)])
    return blocks[slots // block_size] * block_size + slots % block_size


def _slot_mapping(chunks: Sequence[PolicyChunk], firsts: list[int], block_size: int) -> np.ndarray:
    """Every chunk's slots, in order (chunk_slots each; a one-token chunk, the decode
    steady state, without building arrays of its table)."""
    if all(c.num_tokens == 1 for c in chunks):
        return np.array(
            [
                c.block_table[f // block_size] * block_size + f % block_size
                for c, f in zip(chunks, firsts, strict=True)
            ],
            dtype=np.int64,
        )
    return np.concatenate(
        [
            chunk_slots(c.block_table, f, c.num_tokens, block_size)
            for c, f in zip(chunks, firsts, strict=True)
        ]
    )


def planned_recall(chunk: PolicyChunk, first_row: int) -> RecallRows:
    """A recall sequence's chunk, planned by its store (which commits it)."""
    kv = chunk.seq.recall
    if kv is None or kv.state is None:
        raise RuntimeError(f"{chunk.seq.request_id!r} was scheduled without recall state")
    end = chunk.start + chunk.num_tokens
    return RecallRows(kv.state, kv.state.plan(chunk.start, end), first_row)


class KVStepBuilder:
    def __init__(self, cache: KVCache) -> None:
        self.cache = cache

    def build(self, step: PolicyStep) -> StepKV:
        """The step's slots and layouts, and its observer (see the module docstring)."""
        offsets = np.cumsum([0] + [c.num_tokens for c in step.chunks])[:-1].tolist()
        placed = list(zip(step.chunks, offsets, strict=True))
        recalled = [(c, o) for c, o in placed if c.seq.recall is not None]
        if not recalled:
            return self._build(step.chunks, offsets)
        kept = [(c, o) for c, o in placed if c.seq.recall is None]
        built = self._build([c for c, _ in kept], [o for _, o in kept])
        # Planning commits a recall sequence's step (RecallSequence.plan), so it comes
        # last: a SequenceFault above makes the runner build the step again.
        recall = tuple(planned_recall(c, o) for c, o in recalled)
        num_tokens = sum(c.num_tokens for c in step.chunks)
        return replace(built, recall=recall, ordinary_rows=ordinary_rows(num_tokens, recall))

    def _build(self, chunks: Sequence[PolicyChunk], offsets: list[int]) -> StepKV:
        bs = self.cache.block_size
        if not chunks:
            empty = np.zeros(0, dtype=np.int64)
            return StepKV(empty, BatchLayout([], [], [], bs))
        firsts = []
        for c in chunks:
            if c.seq.kv is None:  # no policy to ask: nothing to blame
                firsts.append(first_slot(c))
                continue
            with blame(c.seq.request_id):
                firsts.append(first_slot(c))
        slot_mapping = _slot_mapping(chunks, firsts, bs)
        layout = BatchLayout(
            query_lens=[c.num_tokens for c in chunks],
            context_lens=[f + c.num_tokens for c, f in zip(chunks, firsts, strict=True)],
            block_tables=[c.block_table for c in chunks],
            block_size=bs,
        )
        if all(c.seq.kv is None for c in chunks):
            return StepKV(slot_mapping, layout)
        layer_layouts, layer_of = self._layer_layouts(chunks, firsts)
        observer = self._observer(chunks, firsts, offsets)
        return StepKV(slot_mapping, layout, layer_layouts, layer_of, observer)

    def _layer_layouts(
        self, chunks: Sequence[PolicyChunk], firsts: list[int]
    ) -> tuple[list[LayerLayout], list[int]]:
        """Per layer and chunk, (slot shift, attended blocks or None); one LayerLayout per
        distinct profile. Empty when every layer has shift 0 and no attended blocks."""
        num_layers, bs = self.cache.num_layers, self.cache.block_size
        shifts: list[list[int] | None] = []
        picked: list[list[AttendedBlocks] | None] = []
        for chunk, first in zip(chunks, firsts, strict=True):
            kv = chunk.seq.kv
            with blame(chunk.seq.request_id):  # its policy's answers
                offsets = kv.slot_offsets() if kv is not None else None
                where = ChunkSlots(chunk.start, chunk.num_tokens, first, chunk.block_table, bs)
                picked.append(kv.policy.attended_blocks(kv, where) if kv is not None else None)
            shifts.append(offsets if offsets is not None and any(offsets) else None)
        if all(s is None for s in shifts) and all(p is None for p in picked):
            return [], []
        layouts: list[LayerLayout] = []
        index: dict[tuple[tuple[int, int], ...], int] = {}
        layer_of = []
        for layer in range(num_layers):
            profile = tuple(
                (s[layer] if s is not None else 0, id(p[layer]) if p is not None else 0)
                for s, p in zip(shifts, picked, strict=True)
            )
            if profile not in index:
                index[profile] = len(layouts)
                layouts.append(self._layer_layout(chunks, firsts, shifts, picked, layer))
            layer_of.append(index[profile])
        return layouts, layer_of

    def _layer_layout(
        self,
        chunks: Sequence[PolicyChunk],
        firsts: list[int],
        shifts: list[list[int] | None],
        picked: list[list[AttendedBlocks] | None],
        layer: int,
    ) -> LayerLayout:
        bs = self.cache.block_size
        slots, context_lens, tables = [], [], []
        for chunk, first, shift, blocks in zip(chunks, firsts, shifts, picked, strict=True):
            start = first - (shift[layer] if shift is not None else 0)
            slots.append(chunk_slots(chunk.block_table, start, chunk.num_tokens, bs))
            if blocks is None:
                context_lens.append(start + chunk.num_tokens)
                tables.append(chunk.block_table)
            else:
                context_lens.append(blocks[layer].context_len)
                tables.append(blocks[layer].block_table)
        layout = BatchLayout([c.num_tokens for c in chunks], context_lens, tables, bs)
        return LayerLayout(np.concatenate(slots), layout)

    def _observer(
        self, chunks: Sequence[PolicyChunk], firsts: list[int], offsets: list[int]
    ) -> StepObserver | None:
        """The observer for this step's policies that want queries, or None if none do;
        offsets: each chunk's first row in the flat batch."""
        watched: list[ObservedSequence] = []
        for chunk, first, offset in zip(chunks, firsts, offsets, strict=True):
            kv, end = chunk.seq.kv, chunk.start + chunk.num_tokens
            with blame(chunk.seq.request_id):
                wanted = None if kv is None else kv.policy.observed_queries(kv, chunk.start, end)
                if kv is None or wanted is None or wanted[1] <= wanted[0]:
                    continue
                share = kv.policy.rank_share(kv, *wanted)
            a, b = wanted
            base = first + a - chunk.start
            shifts = kv.slot_offsets()
            device = self.cache.k.device
            table = torch.tensor(chunk.block_table, dtype=torch.long, device=device)
            watched.append(
                ObservedSequence(
                    request_id=chunk.seq.request_id,
                    policy=kv.policy,
                    rows=slice(offset + a - chunk.start, offset + b - chunk.start),
                    first_slot=[base - s for s in shifts],
                    num_slots=[first - s + chunk.num_tokens for s in shifts],
                    table=table,
                    share=share,
                )
            )
        return StepObserver(self.cache, watched) if watched else None
