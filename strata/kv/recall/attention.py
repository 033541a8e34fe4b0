"""RecallAttention: the backend of steps that hold recall sequences, around the engine's.

    rows of the flat batch   | ordinary ... | recall seq A | ordinary | recall seq B |
    write_rope_kv            RoPE for all rows (one kernel on CUDA: rotary_rows.py);
                             ordinary rows' K/V into the pool
                             through the inner backend; recall rows' K/V kept for attend
    attend                   ordinary rows: the inner backend over the pool
                             recall rows: selecting decode rows through their page
                             (page_decode.py), one unit per page; other rows through
                             their sequence's own store (RecallSequence.attend)

Steps without recall rows never see this class: the runner hands the model the inner
backend (and its CUDA graphs) then.

On CUDA the decode units (pages, lone decode rows) attend on side streams, one per
unit, forked from and joined back to the current stream around the layer's recall work:
each unit's work is some hundred small kernels (or their CUDA graph), bound by latency,
so units run side by side instead of one after another. Units share no state, only the
host link.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

from strata.attention.backend import (
    AttentionBackend,
    AttentionMetadata,
    BatchLayout,
    Lookahead,
    QueryOf,
)
from strata.attention.layer_inputs import AttentionInputs, AttentionLayer, Rotary
from strata.kv.recall.fetch import forked
from strata.kv.recall.page_decode import LayerRows, PageStep, page_steps, run_page_step
from strata.kv.recall.rotary_rows import fused_rotated_qkv
from strata.kv.recall.sampled_attention import start_host_part
from strata.kv.recall.sequence import RecallChunk, RecallSequence

Unit = Callable[[], None]


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
    pages: tuple[PageStep, ...] = ()  # the selecting decode rows, by page (page_steps)
    layer: int = -1  # set by for_layer

    def for_layer(self, layer: int) -> RecallMetadata:
        inner = self.inner.for_layer(layer) if self.inner is not None else None
        return replace(self, inner=inner, layer=layer)


def _sparse_layer(meta: RecallMetadata) -> int:
    """The layer's index among the sparse layers: negative for a dense one, or without
    recall rows."""
    return meta.layer - meta.recall[0].state.geometry.dense_layers if meta.recall else -1


def _start_sampled(meta: RecallMetadata, rows: LayerRows) -> None:
    """Two or more sequences sampling this layer: each one's host part starts before any
    decodes, so that they run side by side (sampled_attention.start_host_part)."""
    s = _sparse_layer(meta)
    sampling = [p for p in meta.recall if s >= 0 and p.state.samples(p.chunk)]
    if len(sampling) >= 2:
        for part in sampling:
            r = part.rows
            chunk = part.chunk
            start_host_part(part.state, s, rows.q[r], chunk.num_middle, rows.scale, chunk.start)


def _in_turn(units: list[Unit]) -> None:
    for unit in units:
        unit()


class RecallAttention(AttentionBackend[RecallMetadata]):
    side_streams = True  # CUDA decode rows of several sequences side by side (False: in turn)
    fused_rope = True  # CUDA: RoPE of the step's rows in one kernel (False: A/B runs)
    whole_step = False  # a whole step is in a graph: captured, or rerun on CPU (whole_step_mode)

    def __init__(self, inner: AttentionBackend[Any]) -> None:
        self.inner = inner
        self.name = f"{inner.name}+recall"
        # this layer's k, v and the step's positions: write -> attend
        self._pending: tuple[Tensor, Tensor, Tensor] | None = None
        self._streams: list[torch.cuda.Stream] = []  # side streams of decode rows (CUDA)
        # this forward's page-decoded parts and the sparse layers each was decoded in:
        # their blocks leaving the tails retire after the last layer (retire_paged)
        self._paged: dict[int, tuple[RecallRows, list[int]]] = {}

    def prepare(
        self, layout: BatchLayout, slot_mapping: Tensor, device: torch.device
    ) -> RecallMetadata:
        raise TypeError("RecallAttention metadata comes from the runner (RecallMetadata)")

    def write_rope_kv(
        self, layer: AttentionLayer, qkv: Tensor, inputs: AttentionInputs, meta: RecallMetadata
    ) -> tuple[Tensor, Tensor, Tensor]:
        if layer.fused and qkv.is_cuda and self.fused_rope:
            q, k, v = fused_rotated_qkv(qkv, inputs, layer.heads)
        else:
            q, k, v = inputs.rotated_qkv(qkv, layer.heads)
        i = layer.layer_index
        k_cache, v_cache = inputs.kv.k[i], inputs.kv.v[i]
        if meta.inner is not None:
            self.inner.write_kv(k_cache, v_cache, k[meta.ordinary], v[meta.ordinary], meta.inner)
        self._pending = (k, v, inputs.positions)
        return q, k_cache, v_cache

    def attend(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: RecallMetadata, scale: float
    ) -> Tensor:
        assert self._pending is not None, "attend before write_rope_kv"
        k, v, positions = self._pending
        self._pending = None
        out = torch.empty_like(q)
        if meta.inner is not None:
            out[meta.ordinary] = self.inner.attend(
                q[meta.ordinary], k_cache, v_cache, meta.inner, scale
            )
        if meta.layer == 0:
            self._paged.clear()
        rows = LayerRows(q, k, v, positions, out, scale)
        prefill, decode = self._units(meta, rows)
        for unit in prefill:
            unit()
        _start_sampled(meta, rows)
        if len(decode) >= 2 and q.is_cuda and self.side_streams and not self.whole_step:
            self._side_by_side(decode, q.device)
        else:
            for unit in decode:
                unit()
        if meta.recall and meta.layer == meta.recall[0].state.geometry.num_layers - 1:
            for step in meta.pages:
                if step.page.decoder is not None and step.page.decoder.prefetch is not None:
                    step.page.decoder.prefetch.settle()
            if self.whole_step:  # the step's graph retires after each replay
                self._paged.clear()
            else:
                self.retire_paged()
        return out

    def lookahead(
        self, meta: RecallMetadata, positions: Tensor, rope: Rotary, query_of: QueryOf
    ) -> Lookahead | None:
        """Pages with a cross-layer prefetch (prefetch.py): before layer i, layer i+1's
        queries of layer i's input, for each such page's decoding rows, predict layer
        i+1's picks, fetched while layer i runs."""
        steps = tuple(
            step for step in meta.pages
            if step.page.decoder is not None and step.page.decoder.prefetch is not None
        )  # fmt: skip
        if not steps:
            return None
        dense = meta.recall[0].state.geometry.dense_layers

        def ahead(layer: int, x: Tensor, residual: Tensor | None) -> None:
            s = layer - dense
            for step in steps if s >= 0 else ():
                if any(p.state.policy.wants_all_keys(s) for p in step.parts):
                    continue  # the layer regroups this page (a part still fits its summaries)
                rows = step.flat
                stream = x[rows] if residual is None else x[rows] + residual[rows]
                decoder = step.page.decoder
                assert decoder is not None and decoder.prefetch is not None
                g = decoder.geometry
                q = query_of(layer, stream).view(-1, g.num_heads, g.head_dim)
                q, _ = rope(positions[rows], q, q[:, :1])
                decoder.prefetch.issue(s, q, step.rows, step.active)

        return ahead

    def retire_paged(self) -> None:
        """After the step's last layer: each page-decoded sequence retires the blocks
        leaving its tails, in every run of consecutive sparse layers its page decoded at
        once (every sparse layer, but for a layer that still fitted its summaries)."""
        for part, layers in self._paged.values():
            start = layers[0]
            for prev, s in zip(layers, [*layers[1:], -1], strict=True):
                if s != prev + 1:
                    part.state.retire_after_decode(slice(start, prev + 1), part.chunk)
                    start = s
        self._paged.clear()

    @contextmanager
    def whole_step_mode(self) -> Iterator[None]:
        """While a whole step is captured in a graph (step_graphs.py): pages decode
        without their per-layer graphs, units run in turn, and nothing retires (the step
        graph's caller retires after each replay)."""
        self.whole_step = True
        try:
            yield
        finally:
            self.whole_step = False

    def _units(self, meta: RecallMetadata, rows: LayerRows) -> tuple[list[Unit], list[Unit]]:
        """The layer's recall work as units that each write their rows of `rows.out`:
        prefill chunks, and decode units. A page's decode writes every row of the page (the
        inactive ones unchanged), so the page's other decode rows join its unit, in turn:
        no two units touch one page's tensors on two streams."""
        s = _sparse_layer(meta)
        by_page: dict[int, list[Unit]] = {}
        paged: set[int] = set()
        layer_graphs = not self.whole_step
        for step in self._ready_pages(meta.pages, s, rows.q.device) if s >= 0 else ():
            by_page[id(step.page)] = [partial(run_page_step, step, s, rows, layer_graphs)]
            paged.update(id(p) for p in step.parts)
            for part in step.parts:
                self._paged.setdefault(id(part), (part, []))[1].append(s)
        prefill: list[Unit] = []
        decode: list[Unit] = []
        for part in meta.recall:
            if id(part) in paged:
                continue  # decoded by its page
            unit = partial(self._attend_into, part, meta.layer, rows)
            if part.chunk.num_tokens > 1:
                prefill.append(unit)
            elif id(part.state.page) in by_page:
                by_page[id(part.state.page)].append(unit)
            else:
                decode.append(unit)
        decode += [partial(_in_turn, units) for units in by_page.values()]
        return prefill, decode

    @staticmethod
    def _ready_pages(
        pages: tuple[PageStep, ...], s: int, device: torch.device
    ) -> list[PageStep]:
        """The page steps of sparse layer s, less the parts whose policy wants every key of
        the layer first (they fit their summaries in RecallSequence.attend)."""
        ready: list[PageStep] = []
        for step in pages:
            parts = tuple(p for p in step.parts if not p.state.policy.wants_all_keys(s))
            ready += [step] if len(parts) == len(step.parts) else page_steps(parts, device)
        return ready

    @staticmethod
    def _attend_into(part: RecallRows, layer: int, rows: LayerRows) -> None:
        r = part.rows
        rows.out[r] = part.state.attend(
            layer, rows.q[r], rows.k[r], rows.v[r], part.chunk, rows.scale, rows.positions[r]
        )

    def _side_by_side(self, units: list[Unit], device: torch.device) -> None:
        """Each unit on its own side stream; the current stream waits for all of them."""
        while len(self._streams) < len(units):
            self._streams.append(torch.cuda.Stream(device))
        main = torch.cuda.current_stream(device)
        for unit, stream in zip(units, self._streams, strict=False):
            with forked(stream):
                unit()
        for stream in self._streams[: len(units)]:
            main.wait_stream(stream)
