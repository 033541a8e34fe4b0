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
"""

from __future__ import annotations

import logging

from strata.engine.plan import ScheduledChunk, StepPlan
from strata.engine.runner import ModelRunner
from strata.engine.sequence import Sequence
from strata.kv.manager import KVManager

logger = logging.getLogger("strata.engine")


class ContextReconstruction:
    def __init__(self, runner: ModelRunner, manager: KVManager, max_tokens: int) -> None:
        self.runner = runner
        self.manager = manager
        self.max_tokens = max_tokens
        self.num_tokens = 0  # pass tokens computed, over all sequences

    def run(self, seq: Sequence, passes: list[list[int]]) -> None:
        """Compute each pass after the sequence's context (its first num_computed tokens)."""
        context = seq.token_ids[: seq.num_computed]
        for ids in passes:
            end = len(context) + len(ids)
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
