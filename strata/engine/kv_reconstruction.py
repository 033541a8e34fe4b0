"""Extra prefill passes a KV policy asks for at its compression point (KVzip).

A pass is token ids the model reads after the context, through the same runner, model
and attention backend as any step, with the policy observing its queries:

    slots   | context [0, C) | pass tokens [C, C + len(pass)) |
                               scratch: the next pass overwrites them, and the
                               compaction that follows releases the blocks past C

The pass runs on a shadow of the sequence (the context's ids, then the pass's) that
shares its KV state, in chunks of at most `max_tokens` tokens. It runs synchronously
inside the step's bookkeeping: the other sequences of the batch wait for it. If the
pool cannot hold a pass, the passes stop there (logged); the policy scores what it saw.

Pass tokens take positions C, C+1, ...: past max_model_len when the context is near it.
The engine builds its RoPE tables for max_model_len + PASS_HEADROOM positions; a pass
that would still run past the tables (`max_positions`) is not run (logged).
"""

from __future__ import annotations

import logging

from strata.engine.plan import ScheduledChunk, StepPlan
from strata.engine.runner import ModelRunner
from strata.engine.sequence import Sequence
from strata.kv.manager import KVManager

logger = logging.getLogger("strata.engine")

PASS_HEADROOM = 2304  # positions past max_model_len a pass may use: KVzip's 2048 + prompt


class ContextReconstruction:
    def __init__(
        self, runner: ModelRunner, manager: KVManager, max_tokens: int, max_positions: int
    ) -> None:
        """max_tokens: tokens per forward; max_positions: the model's RoPE table length."""
        self.runner = runner
        self.manager = manager
        self.max_tokens = max_tokens
        self.max_positions = max_positions
        self.num_tokens = 0  # pass tokens computed, over all sequences

    def run(self, seq: Sequence, passes: list[list[int]]) -> None:
        """Compute each pass after the sequence's context (its first num_computed tokens)."""
        context = seq.token_ids[: seq.num_computed]
        for ids in passes:
            end = len(context) + len(ids)
            if end > self.max_positions:
                logger.warning(
                    "request %s: a %d-token reconstruction pass after %d context tokens runs "
                    "past the %d positions the model is built for; its policy scores the "
                    "passes it saw", seq.request_id, len(ids), len(context), self.max_positions,
                )  # fmt: skip
                return
            if not self.manager.grow(seq.request_id, end):
                logger.warning(
                    "request %s: no KV blocks for a %d-token reconstruction pass; its policy "
                    "scores the passes it saw", seq.request_id, len(ids),
                )  # fmt: skip
                return
            shadow = Sequence(
                request_id=seq.request_id,
                prompt=None,
                prompt_token_ids=context + ids,
                params=seq.params,
                seed=seq.seed,
                max_tokens=1,
                kv=seq.kv,
            )
            table = self.manager.block_table(seq.request_id)
            for start in range(len(context), end, self.max_tokens):
                n = min(self.max_tokens, end - start)
                self.runner.compute_logits(StepPlan((ScheduledChunk(shadow, start, n, table),)))
            self.num_tokens += len(ids)
