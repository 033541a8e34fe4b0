"""RecallAttention: the backend of steps that hold recall sequences, around the engine's.

    rows of the flat batch   | ordinary ... | recall seq A | ordinary | recall seq B |
    write_rope_kv            RoPE (torch) for all rows; ordinary rows' K/V into the pool
                             through the inner backend; recall rows' K/V kept for attend
    attend                   ordinary rows: the inner backend over the pool
                             recall rows: each sequence's own store (RecallSequence.attend)

Steps without recall rows never see this class: the runner hands the model the inner
backend (and its CUDA graphs) then.

On CUDA the decode rows of several recall sequences attend on side streams, one per
sequence, forked from and joined back to the current stream around the layer's recall
work: each sequence's work is some hundred small kernels (or their CUDA graph), bound by
latency, so sequences run side by side instead of one after another. A sequence's state
is its own, so the streams share nothing but the host link.
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
    side_streams = True  # CUDA decode rows of several sequences side by side (False: in turn)

    def __init__(self, inner: AttentionBackend[Any]) -> None:
        self.inner = inner
        self.name = f"{inner.name}+recall"
        self._pending: tuple[Tensor, Tensor] | None = None  # this layer's k, v: write -> attend
        self._streams: list[torch.cuda.Stream] = []  # side streams of decode rows (CUDA)

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
        decode = [p for p in meta.recall if p.chunk.num_tokens == 1]
        side = len(decode) >= 2 and q.is_cuda and self.side_streams
        for part in meta.recall:
            if not side or part.chunk.num_tokens > 1:
                out[part.rows] = self._attend_one(part, meta.layer, q, k, v, scale)
        if side:
            self._attend_side_by_side(decode, meta.layer, q, k, v, out, scale)
        return out

    @staticmethod
    def _attend_one(
        part: RecallRows, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float
    ) -> Tensor:
        rows = part.rows
        return part.state.attend(layer, q[rows], k[rows], v[rows], part.chunk, scale)

    def _attend_side_by_side(
        self, parts: list[RecallRows], layer: int, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
        scale: float,
    ) -> None:  # fmt: skip
        """Each part on its own side stream; the current stream waits for all of them."""
        while len(self._streams) < len(parts):
            self._streams.append(torch.cuda.Stream(q.device))
        main = torch.cuda.current_stream(q.device)
        for part, stream in zip(parts, self._streams, strict=False):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                out[part.rows] = self._attend_one(part, layer, q, k, v, scale)
        for stream in self._streams[: len(parts)]:
            main.wait_stream(stream)
