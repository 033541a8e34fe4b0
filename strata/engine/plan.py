"""StepPlan: the scheduler's decision for one step, and the only thing the runner sees."""

from __future__ import annotations

from dataclasses import dataclass

from strata.engine.sequence import Sequence


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute tokens [start, start + num_tokens) of `seq` this step.

    block_table is the sequence's live table (read-only here); it covers every slot up
    to start + num_tokens. `samples` is set when the chunk reaches the sequence's last
    token, so its logits choose the next token.
    """

    seq: Sequence
    start: int
    num_tokens: int
    block_table: list[int]

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def samples(self) -> bool:
        return self.end == self.seq.num_tokens


@dataclass(frozen=True)
class StepPlan:
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[Sequence, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks
