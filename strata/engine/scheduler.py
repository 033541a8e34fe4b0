"""Continuous batching with chunked prefill, prefix reuse and preemption by recompute.

Each step, under a budget of `max_num_batched_tokens`:
1. Running sequences, oldest first, get min(pending tokens, budget left). When blocks
   run out, the most recently admitted running sequence is preempted: its blocks are
   freed (full ones stay in the prefix index) and it returns to the front of the queue
   to be recomputed.
2. If nothing was preempted, waiting sequences are admitted first-come first-served
   while the budget, `max_num_seqs` and free blocks allow. Admission reuses cached
   prefix blocks and computes only the rest.
"""

from __future__ import annotations

from collections import deque

from strata.config import SchedulerConfig
from strata.engine.plan import ScheduledChunk, StepPlan
from strata.engine.sequence import Sequence, SequenceStatus
from strata.kv.manager import KVManager


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self.kv.grow(seq.request_id, seq.num_computed + n):
                victim = self.running.pop()  # the most recently admitted
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                chunks.append(
                    ScheduledChunk(seq, seq.num_computed, n, self.kv.block_table(seq.request_id))
                )
                budget -= n
                i += 1

        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            seq = self.waiting[0]
            match = self.kv.match_prefix(seq.token_ids)
            n = min(seq.num_tokens - match.num_tokens, budget)
            if not self.kv.admit(
                seq.request_id, match, match.num_tokens + n, num_prompt=seq.num_tokens
            ):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.num_computed = match.num_tokens
            if seq.num_cached_tokens < 0:
                seq.num_cached_tokens = match.num_tokens
            self.running.append(seq)
            chunks.append(
                ScheduledChunk(seq, seq.num_computed, n, self.kv.block_table(seq.request_id))
            )
            budget -= n

        return StepPlan(tuple(chunks), tuple(preempted))

    def preempt(self, seq: Sequence) -> None:
        """Preempt a running sequence now: its blocks are freed and it is recomputed later."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._preempt(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq.request_id)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, plan: StepPlan, sampled: list[int]) -> list[Sequence]:
        """Record the step's computed tokens and append sampled ones, in chunk order.

        Returns the sequences that received a new token.
        """
        got_token: list[Sequence] = []
        tokens = iter(sampled)
        for chunk in plan.chunks:
            seq = chunk.seq
            seq.num_computed = chunk.end
            self.kv.commit(seq.request_id, seq.token_ids, seq.num_computed)
            if chunk.samples:
                seq.token_ids.append(next(tokens))
                got_token.append(seq)
        return got_token

    def finish(self, seq: Sequence, reason: str) -> None:
        """Stop a sequence and free its blocks at once, wherever it is."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.kv.free(seq.request_id)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
