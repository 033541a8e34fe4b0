"""Extra prefill passes a KV policy asks for at its compression point (KVzip).

A pass is token ids the model reads after the context, through the same runner, model
and attention backend as any step, with the policy observing its queries:

    slots   | context [0, C) | pass tokens [C, C + len(pass)) |
                               scratch: the next pass overwrites them, and the
                               compaction that follows releases the blocks past C

The pass runs on a shadow of the sequence (the context's ids, then the pass's) that
shares its KV state, in chunks of at most `max_tokens` tokens (`PassForward`, which the
engine implements over its runner). It runs synchronously inside the step's bookkeeping:
the other sequences of the batch wait for it. If the pool cannot hold a pass, the passes
stop there (logged); the policy scores what it saw.

Pass tokens take positions C, C+1, ...: past max_model_len when the context is near it.
The engine builds its RoPE tables for max_model_len + PASS_HEADROOM positions; a pass
that would still run past the tables (`max_positions`) is not run (logged).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from strata.kv.manager import KVManager
from strata.kv.policies.runtime.interfaces import PolicySequence

logger = logging.getLogger("strata.engine")

PASS_HEADROOM = 2304  # positions past max_model_len a pass may use: KVzip's 2048 + prompt


@dataclass(frozen=True)
class PassChunk:
    """Tokens [start, start + num_tokens) of a shadow of a sequence: its tokens are
    `token_ids` (the context, then a pass), its blocks the sequence's `block_table`."""

    token_ids: list[int]
    start: int
    num_tokens: int
    block_table: list[int]


class PassForward(Protocol):
    def __call__(self, seq: PolicySequence, chunk: PassChunk) -> None:
        """Run the model over the chunk of a shadow of `seq` that shares seq's KV state;
        nothing is sampled."""
        ...


@dataclass(frozen=True)
class PassLimits:
    """max_tokens: tokens per forward; max_positions: the model's RoPE table length."""

    max_tokens: int
    max_positions: int


class ContextReconstruction:
    def __init__(self, forward: PassForward, manager: KVManager, limits: PassLimits) -> None:
        self.forward = forward
        self.manager = manager
        self.limits = limits
        self.num_tokens = 0  # pass tokens computed, over all sequences

    def run(self, seq: PolicySequence, passes: list[list[int]]) -> None:
        """Compute each pass after the sequence's context (its first num_computed tokens)."""
        context = seq.token_ids[: seq.num_computed]
        for ids in passes:
            end = len(context) + len(ids)
            if end > self.limits.max_positions:
                logger.warning(
                    "request %s: a %d-token reconstruction pass after %d context tokens runs "
                    "past the %d positions the model is built for; its policy scores the "
                    "passes it saw",
                    seq.request_id, len(ids), len(context), self.limits.max_positions,
                )  # fmt: skip
                return
            if not self.manager.grow(seq.request_id, end):
                logger.warning(
                    "request %s: no KV blocks for a %d-token reconstruction pass; its policy "
                    "scores the passes it saw", seq.request_id, len(ids),
                )  # fmt: skip
                return
            shadow_ids, table = context + ids, self.manager.block_table(seq.request_id)
            step = self.limits.max_tokens
            for start in range(len(context), end, step):
                self.forward(seq, PassChunk(shadow_ids, start, min(step, end - start), table))
            self.num_tokens += len(ids)
