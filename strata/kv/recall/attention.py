"""RecallAttention: the backend of steps that hold recall sequences, around the engine's.

    rows of the flat batch   | ordinary ... | recall seq A | ordinary | recall seq B |
    write_rope_kv            RoPE (torch) for all rows; ordinary rows' K/V into the pool
                             through the inner backend; recall rows' K/V kept for attend
    attend                   ordinary rows: the inner backend over the pool
                             recall rows: each sequence's own store (RecallSequence.attend)

Steps without recall rows never see this class: the runner hands the model the inner
backend (and its CUDA graphs) then.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from strata.attention.backend import AttentionBackend, AttentionMetadata, BatchLayout
from strata.attention.layer_inputs import AttentionInputs, AttentionLayer
from strata.kv.recall.sequence import RecallChunk, RecallSequence


@dataclass(frozen=True)
class RecallRows:
    """One recall sequence's rows [first, first + chunk.num_tokens) of the flat batch."""

    state: RecallSequence
    chunk: RecallChunk
    first: int

    @property
    def rows(self) -> slice:
        return slice(self.first, self.first + self.chunk.num_tokens)


def ordinary_rows(num_tokens: int, recall: tuple[RecallRows, ...]) -> np.ndarray:
    """The flat batch's rows that are not recall rows, in order."""
    pooled = np.ones(num_tokens, dtype=bool)
    for part in recall:
        pooled[part.rows] = False
    return np.flatnonzero(pooled).astype(np.int64)


@dataclass(frozen=True)
class RecallMetadata(AttentionMetadata):
    slot_mapping: Tensor  # the ordinary rows' pool slots
    inner: Any  # the inner backend's StepMetadata over the ordinary rows, or None
    ordinary: Tensor  # [ordinary rows] their indices in the flat batch
    recall: tuple[RecallRows, ...]
    layer: int = -1  # set by for_layer

    def for_layer(self, layer: int) -> RecallMetadata:
        inner = self.inner.for_layer(layer) if self.inner is not None else None
        return replace(self, inner=inner, layer=layer)


class RecallAttention(AttentionBackend[RecallMetadata]):
    def __init__(self, inner: AttentionBackend[Any]) -> None:
        self.inner = inner
        self.name = f"{inner.name}+recall"
        self._pending: tuple[Tensor, Tensor] | None = None  # this layer's k, v: write -> attend

    def prepare(
        self, layout: BatchLayout, slot_mapping: Tensor, device: torch.device
    ) -> RecallMetadata:
        raise TypeError("RecallAttention metadata comes from the runner (RecallMetadata)")

    def write_rope_kv(
        self, layer: AttentionLayer, qkv: Tensor, inputs: AttentionInputs, meta: RecallMetadata
    ) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = inputs.rotated_qkv(qkv, layer.heads)
        i = layer.layer_index
        k_cache, v_cache = inputs.kv.k[i], inputs.kv.v[i]
        if meta.inner is not None:
            self.inner.write_kv(k_cache, v_cache, k[meta.ordinary], v[meta.ordinary], meta.inner)
        self._pending = (k, v)
        return q, k_cache, v_cache

    def attend(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: RecallMetadata, scale: float
    ) -> Tensor:
        assert self._pending is not None, "attend before write_rope_kv"
        k, v = self._pending
        self._pending = None
        out = torch.empty_like(q)
        if meta.inner is not None:
            out[meta.ordinary] = self.inner.attend(
                q[meta.ordinary], k_cache, v_cache, meta.inner, scale
            )
        for part in meta.recall:
            rows = part.rows
            out[rows] = part.state.attend(meta.layer, q[rows], k[rows], v[rows], part.chunk, scale)
        return out
