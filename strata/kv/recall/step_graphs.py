"""RecallStepGraphs: whole decode steps of recall sequences, each one CUDA graph.

A step whose every row is a recall sequence decoding through its page in every sparse
layer (`key_of`) is hundreds of eager launches around the pages' graphs: projections,
norms, RoPE, the page inputs, the dense layers. Once the same rows decode twice in a row,
the whole forward is captured and replayed, one launch a step:

    key       the rows' sequences (their admission serials), in flat-batch order
    step 1    eager (pages from their per-layer graphs); the key is remembered
    step 2    the same key: the forward is captured over static inputs, then replayed
    step 3..  replayed while the key repeats; up to MAX_GRAPHS keys are kept
    after     every replay, the blocks leaving the rows' tails retire (outside the graph)

Invariants:
- What the forward reads that changes from step to step is on the device: token ids and
  positions (copied into the static buffers here), the tails' and middles' counts
  (RecallSequence.plan fills them before the step), the dense layers' writes and lengths
  (from the positions). What the capture froze on the host, the rows' pages, page rows
  and flat rows, is fixed by the key: a sequence keeps its page row for life.
- A graph whose key names a released sequence would never be replayed again (serials
  never repeat); it is dropped at the release (`forget`). A CUDA graph keeps only the
  step's small index tensors alive, not the sequences.
- A dropped graph (released, or the least recently replayed past MAX_GRAPHS) may still
  run on the GPU when steps overlap: it is destroyed only two steps later.
- The logits are the graph's own output, valid until its next replay (as DecodeGraphs').
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from strata.kv.recall.attention import RecallAttention, RecallMetadata, RecallRows
from strata.kv.recall.layer_graphs import capture

logger = logging.getLogger("strata.engine")

Key = tuple[int, ...]
Forward = Callable[[], torch.Tensor]
MAX_GRAPHS = 4  # compositions of rows kept; the least recently replayed goes first


class Recorder(Protocol):
    def capture(self, forward: Forward) -> Forward:
        """Record forward() (without running it); returns what replays it, which returns
        the output it wrote."""
        ...

    def forget_pool(self) -> None:
        """No graph is left: the next capture may take a new memory pool."""
        ...


class CudaRecorder:
    """CUDA graphs on a side stream (layer_graphs.capture), in one memory pool taken anew
    whenever no graph holds it."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)
        self.pool: Any = None

    def capture(self, forward: Forward) -> Forward:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph, out = capture(forward, self.stream, self.pool)

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay

    def forget_pool(self) -> None:
        self.pool = None


class RerunRecorder:
    """For tests on CPU: a replay runs the captured Python again, with the metadata of the
    step it was captured in. A host value the forward read then is read again, stale, as a
    CUDA graph would replay it; device state is read afresh, as a graph reads it."""

    def capture(self, forward: Forward) -> Forward:
        return forward

    def forget_pool(self) -> None:
        pass


@dataclass
class StepGraph:
    replay: Forward  # -> logits [rows, vocab], valid until the next replay
    keep: tuple[torch.Tensor, ...]  # the captured step's index tensors the graph reads


class RecallStepGraphs:
    enabled = True  # False: every recall step runs eagerly (A/B runs)

    def __init__(
        self, model: Callable[..., torch.Tensor], kv: Any, attention: RecallAttention,
        device: torch.device, max_rows: int, recorder: Recorder | None = None,
    ) -> None:  # fmt: skip
        """model: the LlamaModel (called as the runner calls it); max_rows: the most rows a
        captured step has. `forget` must hear of every recall sequence released."""
        self.model, self.kv, self.attention = model, kv, attention
        self.max_rows = max_rows
        self.recorder = recorder if recorder is not None else CudaRecorder(device)
        self.ids = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.rows = torch.arange(max_rows, device=device)  # logits rows: every row samples
        self._graphs: OrderedDict[Key, StepGraph] = OrderedDict()
        self._last: Key | None = None  # the last eager step's key
        self._dropped: deque[list[StepGraph]] = deque([[], []])  # per step, destroyed last
        self.replays = self.captures = 0

    def key_of(self, meta: RecallMetadata, logits_rows: np.ndarray) -> Key | None:
        """The step's key if a graph may run it: every row a recall decode token that
        samples, through its page in every sparse layer; else None."""
        parts = meta.recall
        n = len(parts)
        if meta.inner is not None or not 0 < n <= self.max_rows or len(logits_rows) != n:
            return None
        if len(meta.ordinary) or not np.array_equal(logits_rows, np.arange(n)):
            return None
        if sum(len(p.parts) for p in meta.pages) != n:
            return None  # a row that does not select decodes on its own
        for part in parts:
            policy = part.state.policy
            if any(policy.wants_all_keys(s) for s in range(part.state.geometry.sparse_layers)):
                return None
        return tuple(part.state.serial for part in parts)

    def forward(
        self, meta: RecallMetadata, ids: torch.Tensor, positions: torch.Tensor,
        logits_rows: np.ndarray,
    ) -> torch.Tensor | None:  # fmt: skip
        """The step's logits from its graph, or None: the step runs eagerly (its key is
        remembered, so a repeat is captured)."""
        self._dropped.append([])
        self._dropped.popleft()  # dropped two steps ago: no longer running
        key = self.key_of(meta, logits_rows) if self.enabled else None
        graph = None if key is None else self._graphs.get(key)
        if key is None or (graph is None and key != self._last):
            self._last = key
            return None
        if graph is None:
            try:
                graph = self._capture(key, meta)
            except RuntimeError as exc:  # the forward cannot be captured: run it eagerly
                logger.warning("recall decode steps run eagerly from now on: capturing one "
                               "failed (%s)", exc)  # fmt: skip
                self.enabled = False
                return None
        self._graphs.move_to_end(key)
        n = len(key)
        self.ids[:n].copy_(ids)
        self.positions[:n].copy_(positions)
        with self.attention.whole_step_mode():  # for a recorder that reruns the Python
            logits = graph.replay()
        self.replays += 1
        retire(meta.recall)
        return logits

    def _capture(self, key: Key, meta: RecallMetadata) -> StepGraph:
        while len(self._graphs) >= MAX_GRAPHS:
            self._dropped[-1].append(self._graphs.popitem(last=False)[1])
        if not self._graphs:
            self.recorder.forget_pool()  # no graph holds the old pool's memory
        n = len(key)
        ids, positions, rows = self.ids[:n], self.positions[:n], self.rows[:n]

        def forward() -> torch.Tensor:
            return self.model(ids, positions, self.kv, self.attention, meta, rows)

        with self.attention.whole_step_mode():
            replay = self.recorder.capture(forward)
        keep = [meta.slot_mapping, meta.ordinary]
        keep += [t for page in meta.pages for t in (page.flat, page.rows, page.active)]
        self.captures += 1
        logger.debug("captured a recall decode step of %d rows", n)
        graph = StepGraph(replay, tuple(keep))
        self._graphs[key] = graph
        return graph

    def stats(self) -> dict[str, int]:
        return {
            "recall_step_graph_replays": self.replays,  # whole decode steps from a graph
            "recall_step_graph_captures": self.captures,
            "recall_step_graphs": len(self._graphs),  # kept now
        }

    def forget(self, serial: int) -> None:
        """A recall sequence was released: drop the graphs of steps it was a row of."""
        for key in [k for k in self._graphs if serial in k]:
            self._dropped[-1].append(self._graphs.pop(key))
        if self._last is not None and serial in self._last:
            self._last = None


def retire(parts: tuple[RecallRows, ...]) -> None:
    """After a step's graph: each row's blocks leaving its tails retire, in every sparse
    layer at once (its page decoded them all)."""
    for part in parts:
        layers = slice(0, part.state.geometry.sparse_layers)
        part.state.retire_after_decode(layers, part.chunk)
