"""A worker's recall store: rank 0's mirrored over the worker's own KV heads.

Rank 0 sends the store's size with the pool's (TensorParallel.set_pool): as many host
slots and GPU bytes as its own, so the worker admits whatever rank 0 did. Each step's
recall rows (StepInputs.recall) name the sequences and their chunks (kv/recall/wire.py);
the mirror admits and plans them (kv/recall/mirror.py), and the step attends through
RecallAttention as on rank 0: pool rows through the inner backend, recall rows through
their sequences. Selection is per KV head, so each rank picks for its heads what one
rank would; where it is not (a replicated head's GQA group, shadowkv's basis over
every head), the ranks join in the recall layers themselves (kv/recall/ranks.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from strata.attention.backend import AttentionBackend, StepMetadata
from strata.attention.layer_inputs import Rotary
from strata.config import CacheConfig, ModelConfig
from strata.engine.tp.step_wire import StepInputs
from strata.kv.recall.attention import RecallAttention, RecallMetadata, ordinary_rows
from strata.kv.recall.build import build_recall
from strata.kv.recall.mirror import RecallMirror
from strata.kv.recall.page_decode import page_steps
from strata.kv.recall.ranks import HeadShard


@dataclass(frozen=True)
class RecallSize:
    """Rank 0's recall store: host slots and GPU bytes (each rank's is as large), and the
    model's KV heads."""

    slots: int
    gpu_bytes: int
    model_kv_heads: int


class WorkerRecall:
    def __init__(self, mirror: RecallMirror, backend: AttentionBackend[Any]) -> None:
        self.mirror = mirror
        self.attention = RecallAttention(backend)

    @classmethod
    def build(
        cls, cache: CacheConfig, model: ModelConfig, dtype: torch.dtype, device: torch.device,
        rope: Rotary | None, backend: AttentionBackend[Any], size: RecallSize, shard: HeadShard,
    ) -> WorkerRecall:  # fmt: skip
        manager = build_recall(cache, model, dtype, device, size.gpu_bytes, rope, graphs=False,
                               num_slots=size.slots, shard=shard)  # fmt: skip
        return cls(RecallMirror(manager), backend)

    def metadata(
        self, step: StepInputs, slots: torch.Tensor, inner: StepMetadata | None
    ) -> RecallMetadata:
        """The step's metadata: `inner` over its pool rows (None when it has none)."""
        rows = self.mirror.rows(step.recall)
        ordinary = torch.from_numpy(ordinary_rows(len(step.ids), rows)).to(slots.device)
        return RecallMetadata(slots, inner, ordinary, rows, page_steps(rows, slots.device))

