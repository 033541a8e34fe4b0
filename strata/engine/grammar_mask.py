"""GrammarMasks: the step's token bitmasks for its grammar-constrained rows, on the device.

    rows        | r0 (json) | r1 (free) | r2 (regex) |
    bitmask     |  filled   |  unread   |  filled    |   int32 [rows, ceil(vocab / 32)]
    logits      -inf wherever a row's bit is 0, applied by xgrammar's kernel, in place on a copy

The runner fills the bitmask on the host after it has launched the model (runner.py),
so on a GPU the masks are computed while the model runs. Filling uses xgrammar's batch
matcher (its own threads). Constrained and unconstrained rows share one step and one
sampler call; a row's mask depends only on its own matcher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from strata.engine.sequence import Sequence

if TYPE_CHECKING:
    import xgrammar


@dataclass(frozen=True)
class GrammarMasks:
    rows: list[int] | torch.Tensor  # the constrained sampling rows (int32 on CUDA)
    bitmask: torch.Tensor  # int32 [all sampling rows, words], on the logits' device

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [rows, vocab] -> a copy with disallowed tokens at -inf."""
        import xgrammar

        masked = logits.clone()
        # xgrammar's CUDA (Triton) path takes the rows as a tensor; its hint says list only
        rows: Any = self.rows
        xgrammar.apply_token_bitmask_inplace(masked, self.bitmask, indices=rows)
        return masked


class GrammarMaskBuilder:
    """Fills the step's bitmask from its rows' matchers (one batch matcher, reused).

    xgrammar fills the constrained rows straight into a host buffer that lives as long as
    the builder; the apply reads only those rows, so the others are never written. On
    CUDA two pinned buffers alternate (bitmask and row numbers), each copied to the device
    without blocking, and a buffer is rewritten only after the event recorded behind its
    last copy. The row numbers go to the device as a tensor: from a Python list, xgrammar
    would copy them from pageable memory, which waits for the model's kernels. A step's
    masks are valid until the next build (on CPU they are the buffer itself)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cuda = device.type == "cuda"
        self._batch: xgrammar.BatchGrammarMatcher | None = None
        # per turn: the bitmask [capacity, words] and the row numbers [capacity]
        self._host: list[tuple[torch.Tensor, torch.Tensor] | None] = [None, None]
        self._events: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def build(self, seqs: list[Sequence], vocab: int) -> GrammarMasks | None:
        """Masks for sampling rows `seqs`; None when no row is constrained."""
        rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
        matchers = [m for s in seqs if (m := s.grammar) is not None]
        if not rows:
            return None
        import xgrammar

        if self._batch is None:
            self._batch = xgrammar.BatchGrammarMatcher()
        bitmask, row_numbers = self._buffers(len(seqs), -(-vocab // 32))
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask, indices=rows)
        if not self._cuda:
            return GrammarMasks(rows, bitmask)
        row_numbers.numpy()[: len(rows)] = rows
        on_device = bitmask.to(self.device, non_blocking=True)
        rows_on_device = row_numbers[: len(rows)].to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._events[self._turn] = event
        return GrammarMasks(rows_on_device, on_device)

    def _buffers(self, rows: int, words: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's host bitmask [rows, words] and row-number buffer [>= rows] (the
        next pair of the two on CUDA)."""
        if self._cuda:
            self._turn = 1 - self._turn
            event = self._events[self._turn]
            if event is not None:
                event.synchronize()  # its copies were issued two builds ago: long done
        held = self._host[self._turn]
        if held is None or held[0].shape[0] < rows or held[0].shape[1] != words:
            capacity = max(rows, 64)
            held = (
                torch.empty((capacity, words), dtype=torch.int32, pin_memory=self._cuda),
                torch.empty(capacity, dtype=torch.int32, pin_memory=self._cuda),
            )
            self._host[self._turn] = held
        return held[0][:rows], held[1]
