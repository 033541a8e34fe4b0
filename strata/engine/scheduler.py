"""Continuous batching with chunked prefill, prefix reuse from every tier, and preemption.

Each step, under a budget of `max_num_batched_tokens`:
1. Sequences whose load from the KV tiers landed join the running ones with the loaded
   prefix computed. `TierLoads` keeps every piece of tier bookkeeping (probes, loads,
   swaps, write-through); without tiers it is a no-op.
2. Running sequences, oldest first, get min(pending tokens, budget left). When blocks
   run out, session pins on the GPU are released first; then the most recently
   admitted running sequence is preempted: its blocks are freed (full ones stay
   cached, and with a CPU tier also below) and it returns to the front of the queue.
   With swap preemption its blocks are pinned in the CPU tier until it is re-admitted.
3. If nothing was preempted, waiting sequences are admitted in arrival order while the
   budget, `max_num_seqs` and free blocks allow. A sequence's prefix is taken from the
   GPU pool where cached there; the blocks after that which a tier holds are loaded
   (the sequence waits in `loading`, other sequences keep running); the rest is
   computed. A sequence whose remote lookup is still in flight is passed over for now.

    token_ids | gpu hit ... | tier hit (loaded) ... | computed ............ |
              |<- match --->|<-- load, async ------>|<- chunks, this step ->|

With reuse around holes (a lossless sequence, `KVManager.reuse_holes`), GPU-cached
blocks after a missing one are kept too; a chunk stops at the next of them, and
`num_computed` then jumps past them. Blocks the GPU lacks are loaded where a tier holds
them; the holes left are computed.

    token_ids | gpu hit | tier hit | hole (computed) | gpu hit | tier hit | hole | rest |
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from strata.config import SchedulerConfig
from strata.engine.overlap import PENDING
from strata.engine.plan import ScheduledChunk, StepPlan
from strata.engine.prompt_logprobs import next_unscored
from strata.engine.sequence import Sequence, SequenceStatus
from strata.errors import SequenceFault, blame
from strata.kv.manager import KVManager, PrefixMatch
from strata.kv.recall.manager import RecallKV, RecallManager
from strata.kv.tiers.loads import TierLoads

logger = logging.getLogger("strata.scheduler")


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVManager,
        tier_loads: TierLoads[Sequence],
        reclaim: Callable[[], bool] | None = None,
        recall: RecallManager | None = None,
    ) -> None:
        self.config = config
        self.recall = recall  # the recall store's sequences hold no pool blocks
        self.kv = kv
        self.tier_loads = tier_loads
        self.reclaim = reclaim  # frees pinned GPU blocks; True if it freed any
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def loading(self) -> Mapping[str, Sequence]:
        """Admitted sequences waiting for their prefix to arrive from a tier, by id."""
        return self.tier_loads.loading

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.tier_loads.probe(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.tier_loads.in_flight)

    # ---- one step -------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        for seq in self.tier_loads.landed():
            self._skip_reused(seq)
            self.running.append(seq)
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        faults: list[SequenceFault] = []

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.recall is not None:  # its KV is in the recall store: no blocks to grow
                budget -= self._recall_chunk(seq, budget, chunks)
                i += 1
                continue
            if seq.token_ids[-1] == PENDING and seq.num_output_tokens >= seq.max_tokens:
                i += 1  # its last token is on the way and ends it (overlap.py)
                continue
            n = self._to_hole_end(seq, min(seq.num_tokens - seq.num_computed, budget))
            spare = 0
            if seq.kv is not None:
                try:
                    with blame(seq.request_id):  # its KV policy's answers
                        n = seq.kv.chunk_limit(seq.num_computed, n)
                        spare = self._spare_blocks(seq, n)
                except SequenceFault as fault:
                    faults.append(fault)  # left out of the step; the engine fails it
                    i += 1
                    continue
            slots = seq.num_kv_slots + n + spare * self.kv.block_size
            while not self.kv.grow(seq.request_id, slots):
                if self.reclaim is not None and self.reclaim():
                    continue
                victim = self._victim()
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

        if not preempted:
            budget = self._admit(budget, chunks, faults)
        return StepPlan(tuple(chunks), tuple(preempted), faults)

    def _admit(self, budget: int, chunks: list[ScheduledChunk], faults: list[SequenceFault]) -> int:
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) + len(self.loading) >= self.config.max_num_seqs:
                break
            if self.tier_loads.is_probing(seq):
                continue  # its remote lookup is in flight; later arrivals may go first
            if seq.recall is not None:
                if not self._admit_recall(seq):
                    break
                budget -= self._recall_chunk(seq, budget, chunks)
                continue
            try:
                with blame(seq.request_id):
                    tokens = self._matchable(seq)
            except SequenceFault as fault:
                faults.append(fault)  # stays queued until the engine fails it
                continue
            match = self._match(seq, tokens)
            hits = self.tier_loads.hits(seq, tokens, match)
            if hits:
                num_tokens = (hits[-1][0] + 1) * self.kv.block_size
                if not self._admit_blocks(seq, match, num_tokens):
                    break
                self._start(seq, match)
                self.tier_loads.start(seq, hits)
                continue
            try:
                n, spare = self._first_chunk(seq, match, budget)
            except SequenceFault as fault:
                faults.append(fault)
                continue
            slots = match.num_tokens + n + spare * self.kv.block_size
            if not self._admit_blocks(seq, match, slots):
                break
            self._start(seq, match)
            n = self._to_hole_end(seq, n)  # as admitted (_admit_blocks may match again)
            self.running.append(seq)
            self.tier_loads.resumed(seq)
            chunks.append(
                ScheduledChunk(seq, seq.num_computed, n, self.kv.block_table(seq.request_id))
            )
            budget -= n
        return budget

    def _admit_recall(self, seq: Sequence) -> bool:
        """Admit a recall sequence: its store state, and an empty, never indexed table. A
        new one starts after the prompt blocks it reused from the store."""
        assert seq.recall is not None
        if self.recall is None:
            raise RuntimeError("a recall sequence reached an engine without a recall store")
        resumed = seq.recall.state is not None  # preempted: its store state was kept
        if not resumed and not self.recall.admit(
            seq.request_id, seq.recall, waiting=self._waiting_recall(seq.recall),
            reuse_limit=next_unscored(seq),  # prompt positions to score are computed
        ):  # fmt: skip
            return False
        match = PrefixMatch((), (), self.kv.block_size, self.kv.root)
        self.kv.admit(seq.request_id, match, 0, num_prompt=0)
        self.kv.stop_indexing(seq.request_id)
        state = seq.recall.state
        assert state is not None
        computed = seq.num_computed if resumed else state.computed
        self._start(seq, match)
        if not resumed:
            seq.num_cached_tokens = computed  # the prompt tokens it reused
        seq.num_computed = computed
        self.running.append(seq)
        return True

    def _waiting_recall(self, kv: RecallKV) -> int:
        """Waiting sequences of kv's recall kind, not yet admitted (a new page's rows)."""
        assert self.recall is not None
        kind, recall = self.recall.kind(kv), self.recall
        queued = [s.recall for s in self.waiting if s.recall is not None]
        return sum(1 for q in queued if q.state is None and recall.kind(q) == kind)

    @staticmethod
    def _recall_chunk(seq: Sequence, budget: int, chunks: list[ScheduledChunk]) -> int:
        """Schedule a recall sequence's next tokens (no pool blocks); returns how many."""
        n = min(seq.num_tokens - seq.num_computed, budget)
        chunks.append(ScheduledChunk(seq, seq.num_computed, n, []))
        return n

    def _victim(self) -> Sequence:
        """The most recently admitted running sequence that holds pool blocks."""
        victim = next(s for s in reversed(self.running) if s.recall is None)
        self.running.remove(victim)
        return victim

    def _first_chunk(self, seq: Sequence, match: PrefixMatch, budget: int) -> tuple[int, int]:
        """(tokens to compute now, spare blocks to reserve) for a sequence being admitted."""
        n = min(seq.num_tokens - match.num_tokens, budget)
        if match.ahead:
            n = min(n, match.ahead[0][0] * self.kv.block_size - match.num_tokens)
        if seq.kv is None:
            return n, 0
        with blame(seq.request_id):
            n = seq.kv.chunk_limit(match.num_tokens, n)
            budgets = seq.kv.budgets_after(match.num_tokens + n)
        if budgets is None:
            return n, 0
        # Matched blocks already held elsewhere get copied before a compaction.
        head = match.block_ids[: self.kv.blocks_for(max(budgets))]
        return n, sum(1 for b in head if self.kv.pool.refcount[b] > 0)

    def _admit_blocks(self, seq: Sequence, match: PrefixMatch, num_tokens: int) -> bool:
        while True:
            if self.kv.admit(seq.request_id, match, num_tokens, num_prompt=seq.num_tokens):
                return True
            if self.reclaim is None or not self.reclaim():
                return False
            match = self._match(seq, self._matchable(seq))  # pins released

    def _match(self, seq: Sequence, tokens: list[int]) -> PrefixMatch:
        """The cached blocks for `tokens`; past holes only for a lossless sequence (a KV
        policy observes its prefill in order)."""
        holes = self.kv.reuse_holes and seq.kv is None
        return self.kv.match_prefix(tokens, seq.cache_salt, holes=holes)

    def _start(self, seq: Sequence, match: PrefixMatch) -> None:
        self.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        seq.num_computed = match.num_tokens
        if seq.num_cached_tokens < 0:
            seq.num_cached_tokens = match.num_reused_tokens

    def _to_hole_end(self, seq: Sequence, n: int) -> int:
        """`n` tokens to compute, cut where the sequence's next reused block starts."""
        end = self.kv.hole_end(seq.request_id)
        return n if end is None else min(n, end - seq.num_computed)

    def _skip_reused(self, seq: Sequence) -> None:
        seq.num_computed = self.kv.skip_reused(seq.request_id, seq.num_computed)

    def _matchable(self, seq: Sequence) -> list[int]:
        """The tokens a prefix hit may cover (one is always left to compute): under a KV
        policy, not the queries it observes; with prompt logprobs, not the positions
        still to be scored."""
        end = seq.num_tokens
        if seq.kv is not None:
            end = seq.kv.first_observed_token() + 1
        unscored = next_unscored(seq)
        if unscored is not None:
            end = min(end, unscored + 1)
        return seq.token_ids[:end]

    def _spare_blocks(self, seq: Sequence, n: int) -> int:
        """Blocks a compaction right after this chunk must copy shared head blocks into."""
        if seq.kv is None:
            return 0
        budgets = seq.kv.budgets_after(seq.num_computed + n)
        if budgets is None:
            return 0
        return self.kv.cow_reserve(seq.request_id, self.kv.blocks_for(max(budgets)))

    # ---- preemption -------------------------------------------------------------------------

    def preempt(self, seq: Sequence) -> None:
        """Preempt a running sequence now: its blocks are freed and it is recomputed later."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._preempt(seq)

    def _preempt(self, seq: Sequence) -> None:
        if seq.kv is None and seq.recall is None:  # only lossless pool blocks are swapped
            self.tier_loads.swap_out(seq)  # before the free: it pins the blocks' keys
        self.kv.free(seq.request_id)
        if seq.recall is None:  # a recall sequence's KV stays in its store: it resumes as was
            seq.num_computed = 0
            if seq.kv is not None:
                seq.kv.reset()  # recomputed from the start, compressed again on the way
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release_recall(self, seq: Sequence) -> None:
        if seq.recall is not None and self.recall is not None:
            self.recall.release(seq.request_id)

    # ---- after the step ----------------------------------------------------------------------

    def record_computed(self, plan: StepPlan, computed: Any = None) -> None:
        """The plan's tokens are computed: their full blocks indexed and written through,
        behind `computed` (a CUDA event after the step's kernels, or None on CPU). A
        sequence finished or preempted since the plan was made is left alone."""
        for chunk in plan.chunks:
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed = chunk.end
            self._skip_reused(seq)
            self.kv.commit(seq.request_id, seq.token_ids, seq.num_computed)
            if seq.recall is not None and self.recall is not None:
                self.recall.commit(seq.request_id)  # its prompt blocks, once computed
        self.tier_loads.write_through(computed)

    @staticmethod
    def append_tokens(rows: list[Sequence], sampled: list[int]) -> list[Sequence]:
        """Row i's sampled token goes to rows[i]; returns them."""
        for seq, token in zip(rows, sampled, strict=True):
            seq.token_ids.append(token)
        return rows

    def finish(self, seq: Sequence, reason: str) -> None:
        """Stop a sequence and free its blocks at once, wherever it is.

        A sequence still loading keeps its blocks until the load lands (the mover is
        writing them), then they are freed.
        """
        if not self.tier_loads.finish(seq):
            if seq.status is SequenceStatus.RUNNING:
                self.running.remove(seq)
            elif seq.status is SequenceStatus.WAITING:
                self.waiting.remove(seq)
            self.kv.free(seq.request_id)
        self._release_recall(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
