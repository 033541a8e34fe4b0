"""The parts of a step's batch that depend on KV policies (the runner calls these).

A sequence under a policy holds fewer KV slots than computed tokens, so a chunk's tokens
go to slots from `first_slot` on while RoPE still uses their token positions:

    chunk tokens   [start, end)            positions (RoPE), as without a policy
    chunk slots    [first, first + n)      first = start - tokens evicted (longest layer)

Layers with their own budgets (PyramidKV) hold fewer slots than the longest: their
chunk goes `shift` slots lower, so each layer gets its own slot mapping and context
lengths (`LayerwiseMetadata`), with the same block tables.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from strata.attention.backend import AttentionBackend, BatchLayout, LayerwiseMetadata
from strata.engine.plan import ScheduledChunk, StepPlan
from strata.kv.cache import KVCache
from strata.kv.policies.observer import ObservedSequence, StepObserver


def first_slot(chunk: ScheduledChunk) -> int:
    """The slot of the chunk's first token in the sequence's longest layer."""
    kv = chunk.seq.kv
    return chunk.start if kv is None else chunk.start - min(kv.evicted)


def layer_shifts(plan: StepPlan, num_layers: int) -> list[tuple[int, ...]] | None:
    """Per layer, each chunk's slot shift below its longest layer; None if all are 0."""
    per_chunk = [
        c.seq.kv.slot_offsets() if c.seq.kv is not None else [0] * num_layers for c in plan.chunks
    ]
    if not any(any(offsets) for offsets in per_chunk):
        return None
    return [tuple(offsets[layer] for offsets in per_chunk) for layer in range(num_layers)]


def chunk_slots(chunk: ScheduledChunk, block_size: int, shift: int = 0) -> np.ndarray:
    """Physical slots of the chunk's tokens."""
    first = first_slot(chunk) - shift
    slots = np.arange(first, first + chunk.num_tokens, dtype=np.int64)
    table = np.asarray(chunk.block_table[: -(-(first + chunk.num_tokens) // block_size)])
    return table[slots // block_size] * block_size + slots % block_size


def layout_of(
    plan: StepPlan, block_size: int, shifts: tuple[int, ...] | None = None
) -> BatchLayout:
    shifts = shifts or (0,) * len(plan.chunks)
    return BatchLayout(
        query_lens=[c.num_tokens for c in plan.chunks],
        context_lens=[
            first_slot(c) - s + c.num_tokens for c, s in zip(plan.chunks, shifts, strict=True)
        ],
        block_tables=[c.block_table for c in plan.chunks],
        block_size=block_size,
    )


def layerwise_metadata(
    plan: StepPlan,
    shifts: list[tuple[int, ...]],
    block_size: int,
    backend: AttentionBackend,
    device: torch.device,
) -> LayerwiseMetadata:
    """One backend metadata per distinct shift profile, shared by the layers that have it."""
    built: dict[tuple[int, ...], Any] = {}
    for profile in shifts:
        if profile not in built:
            slots = np.concatenate(
                [chunk_slots(c, block_size, s) for c, s in zip(plan.chunks, profile, strict=True)]
            )
            slot_t = torch.from_numpy(slots).to(device, non_blocking=True)
            built[profile] = backend.prepare(layout_of(plan, block_size, profile), slot_t, device)
    return LayerwiseMetadata([built[profile] for profile in shifts])


def step_observer(plan: StepPlan, cache: KVCache) -> StepObserver | None:
    """The observer for this step's policies that want queries, or None if none do."""
    watched: list[ObservedSequence] = []
    offset = 0
    for chunk in plan.chunks:
        kv = chunk.seq.kv
        wanted = None if kv is None else kv.policy.observed_queries(kv, chunk.start, chunk.end)
        if kv is not None and wanted is not None and wanted[1] > wanted[0]:
            a, b = wanted
            base = first_slot(chunk) + a - chunk.start
            offsets = kv.slot_offsets()
            table = torch.tensor(chunk.block_table, dtype=torch.long, device=cache.k.device)
            watched.append(
                ObservedSequence(
                    policy=kv.policy,
                    rows=slice(offset + a - chunk.start, offset + b - chunk.start),
                    first_slot=[base - s for s in offsets],
                    num_slots=[first_slot(chunk) - s + chunk.num_tokens for s in offsets],
                    table=table,
                )
            )
        offset += chunk.num_tokens
    return StepObserver(cache, watched) if watched else None
