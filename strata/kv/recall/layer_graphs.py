"""LayerGraphs: a recall page's decode attention per sparse layer, as CUDA graphs.

A page's decode attention in a layer is some hundred small kernels (selection,
working-set bookkeeping, fetches, attention), whose launches cost far more than their
work. Its shapes do not change from step to step (page_decode.py: every row of the page
runs, the step's counts and active rows live in device tensors), so each layer's kernels
are captured once and replayed:

    run 1 of a layer   eager: compiles kernels, allocates lazily (and is a real step)
    run 2              captured (nothing executes), then replayed
    run 3...           replayed

Invariants:
- The function reads its inputs from tensors that never move (the page's buffers and
  its decoder's input tensors, written before each run), so a replay sees the step's.
- The page's graphs share one memory pool, taken anew whenever it has no graph (a
  pool dies with its last graph). Only a graph's output outlives its replay, and it
  stays referenced here, so no graph's live memory is handed to another; replays run
  one after another in stream order. The caller copies the output out before the next run.
- Graphs are captured on a side stream, in thread-local capture mode, so the engine's
  other threads (tier transfers) keep using CUDA meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

DecodeFn = Callable[[], torch.Tensor]


class LayerGraphs:
    def __init__(self, stream: torch.cuda.Stream) -> None:
        self.stream = stream
        self._pool: Any = None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._warm: set[int] = set()
        self.replays = 0

    def run(self, layer: int, fn: DecodeFn) -> torch.Tensor:
        """fn() for `layer`, eager the first time, from its graph after that; the result
        is valid until the next run."""
        captured = self._graphs.get(layer)
        if captured is None and layer not in self._warm:
            self._warm.add(layer)
            return fn()
        if captured is None:
            captured = self._capture(fn)
            self._graphs[layer] = captured
        graph, out = captured
        graph.replay()
        self.replays += 1
        return out

    def _capture(self, fn: DecodeFn) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if not self._graphs:
            self._pool = torch.cuda.graph_pool_handle()
        return capture(fn, self.stream, self._pool)

    def clear(self) -> None:
        """Drop every graph: the page goes away."""
        self._graphs.clear()
        self._warm.clear()


def capture(
    fn: DecodeFn, stream: torch.cuda.Stream, pool: Any
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """fn() captured (not run) into a graph on `stream`, in thread-local capture mode (the
    engine's tier threads use CUDA meanwhile), with memory from `pool`; and its output."""
    graph = torch.cuda.CUDAGraph()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            out = fn()
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    return graph, out
