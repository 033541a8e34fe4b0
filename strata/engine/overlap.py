"""Overlap scheduling: the host prepares step k+1 while the GPU runs step k.

    GPU    | forward k ................... | sample k | forward k+1 ............ | ...
    host   | tokens of k-1 -> outputs | sample k launched | schedule k+1 | forward k+1 launched

Each engine step handles three steps of the pipeline, oldest first:
1. the tokens of the step sampled last time (a SampledStep) reach the host through
   pinned buffers behind an event; they replace their sequences' PENDING placeholders,
   and stop checks and outputs follow as in a synchronous step;
2. the step launched last time (a LaunchedStep) is sampled: its sampling batch sees every
   token before it (penalties, seeds and grammar masks are exact), and its sequences are
   marked computed, each sampling one holding a PENDING placeholder for its new token;
3. the next step is scheduled and its forward launched. A placeholder's position takes
   its input id on the device, gathered from the sampled tensor (the runner's feed).

The host waits only for the tokens of the step before the one the GPU is running, so
its work hides behind the GPU's. A sequence whose last token ends it is found one step
late: the row the next step computed for it is dropped (its KV slot lies in a block
that was never indexed, so nothing reads it). Steps that need their tokens at once
(KV policies, recall, prompt logprobs) run synchronously, behind the in-flight tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from strata.config import EngineConfig
from strata.engine.plan import StepPlan
from strata.engine.sampler import SamplerOutput
from strata.engine.sequence import PENDING, Sequence

__all__ = [
    "PENDING", "LaunchedStep", "SampledStep", "copy_to_host", "resolve_overlap", "sampling_seqs",
]


@dataclass(frozen=True)
class LaunchedStep:
    """A step whose forward is queued and whose sampling is not."""

    plan: StepPlan
    logits: torch.Tensor | None  # its sampling rows, then its prompt rows; None: no row
    computed: torch.cuda.Event | None  # after its forward: tier stores wait on it


class SampledStep:
    """A step whose tokens are on their way to pinned host memory."""

    def __init__(self, plan: StepPlan, seqs: list[Sequence], sampled: SamplerOutput) -> None:
        self.plan = plan
        self.seqs = seqs  # row i's sequence
        self.tokens = sampled.token_ids  # on the device: the next step's feed
        self._row = {id(s): i for i, s in enumerate(seqs)}
        self._host, self._ready = copy_to_host(sampled)

    def row(self, seq: Sequence) -> int | None:
        """The sampled row of `seq`, or None if this step sampled nothing for it."""
        return self._row.get(id(seq))

    def wait(self) -> SamplerOutput:
        """The tokens (and logprobs) on the host, once their copy has landed."""
        if self._ready is not None:
            self._ready.synchronize()
        return self._host


def copy_to_host(sampled: SamplerOutput) -> tuple[SamplerOutput, torch.cuda.Event | None]:
    """Non-blocking copies of the sampler's tensors into pinned memory, and the event
    after them (None on CPU, where the tensors already are the host's)."""
    if not sampled.token_ids.is_cuda:
        return sampled, None

    def host(t: torch.Tensor) -> torch.Tensor:
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)

    def maybe(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else host(t)

    copied = SamplerOutput(
        host(sampled.token_ids), maybe(sampled.logprobs), maybe(sampled.top_ids),
        maybe(sampled.top_logprobs),
    )  # fmt: skip
    ready = torch.cuda.Event()
    ready.record()
    return copied, ready


def sampling_seqs(plan: StepPlan) -> tuple[Sequence, ...]:
    """The sequences of the plan's sampling chunks, in row order (ScheduledChunk.samples is
    fixed when the chunk is made, so a token appended since does not move a row)."""
    return tuple(c.seq for c in plan.chunks if c.samples)


def resolve_overlap(config: EngineConfig, device: torch.device) -> bool:
    """Whether the engine overlaps its steps: `overlap_scheduling` on, or auto on a CUDA
    device without tensor parallelism (its workers take ids from the host) or expert
    offloading (its forward reads the routing on the host)."""
    mode = config.scheduler.overlap
    if mode == "auto":
        return (
            device.type == "cuda"
            and config.parallel.tensor_parallel_size == 1
            and not config.moe.enabled
        )
    return mode == "on"
