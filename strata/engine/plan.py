"""StepPlan: the scheduler's decision for one step, and the only thing the runner sees."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from strata.engine.sequence import Sequence
from strata.errors import SequenceFault


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute tokens [start, start + num_tokens) of `seq` this step.

    block_table is the sequence's live table (read-only here); it covers every slot up
    to start + num_tokens. `samples` is set when the chunk reaches the sequence's last
    token as the chunk is made, so its logits choose the next token (fixed then: a token
    appended later does not change what the chunk's row means).
    """

    seq: Sequence
    start: int
    num_tokens: int
    block_table: list[int]
    end: int = field(init=False)
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        end = self.start + self.num_tokens
        object.__setattr__(self, "end", end)
        object.__setattr__(self, "samples", end == self.seq.num_tokens)


@dataclass(frozen=True)
class StepPlan:
    """The chunks to compute, the sequences preempted to make room, and the faults of
    this step: requests that failed on their own (errors.SequenceFault). Whoever finds a
    fault appends it and leaves the request's chunk out of what follows; the engine then
    fails those requests alone."""

    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[Sequence, ...] = ()
    faults: list[SequenceFault] = field(default_factory=list)

    def without(self, fault: SequenceFault) -> StepPlan:
        """This plan with the faulty request's chunk left out and its fault recorded."""
        self.faults.append(fault)
        chunks = tuple(c for c in self.chunks if c.seq.request_id != fault.request_id)
        return replace(self, chunks=chunks)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks
