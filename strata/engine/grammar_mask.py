"""GrammarMasks: the step's token bitmasks for its grammar-constrained rows, on the device.

    rows        | r0 (json) | r1 (free) | r2 (regex) |
    bitmask     |  filled   | all ones  |  filled    |   int32 [rows, ceil(vocab / 32)]
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
    rows: list[int]  # the constrained sampling rows
    bitmask: torch.Tensor  # int32 [all sampling rows, words], on the logits' device

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [rows, vocab] -> a copy with disallowed tokens at -inf."""
        import xgrammar

        masked = logits.clone()
        xgrammar.apply_token_bitmask_inplace(masked, self.bitmask, indices=self.rows)
        return masked


class GrammarMaskBuilder:
    """Fills the step's bitmask from its rows' matchers (one batch matcher, reused)."""

    def __init__(self) -> None:
        self._batch: xgrammar.BatchGrammarMatcher | None = None

    def build(
        self, seqs: list[Sequence], vocab: int, upload: Any
    ) -> GrammarMasks | None:
        """Masks for sampling rows `seqs`; None when no row is constrained. `upload` moves
        the host bitmask (numpy int32) to the device."""
        rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
        matchers = [m for s in seqs if (m := s.grammar) is not None]
        if not rows:
            return None
        import xgrammar

        if self._batch is None:
            self._batch = xgrammar.BatchGrammarMatcher()
        bitmask = xgrammar.allocate_token_bitmask(len(seqs), vocab)
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask, indices=rows)
        return GrammarMasks(rows, upload(bitmask.numpy()))
