"""Continuous batching with chunked prefill, prefix reuse from every tier, and preemption.

Each step, under a budget of `max_num_batched_tokens`:
1. Loads from the KV tiers that finished are collected: their sequences join the
   running ones with the loaded prefix computed.
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
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from strata.config import SchedulerConfig
from strata.engine.plan import ScheduledChunk, StepPlan
from strata.engine.sequence import Sequence, SequenceStatus
from strata.kv.manager import KVManager, PrefixMatch
from strata.kv.tiers.manager import BlockRef, LoadDone, ProbeDone, TierManager

logger = logging.getLogger("strata.scheduler")


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVManager,
        preemption_mode: str = "recompute",
        reclaim: Callable[[], bool] | None = None,
        swap_is_cheaper: Callable[[int], bool] | None = None,
    ) -> None:
        self.config = config
        self.kv = kv
        self.preemption_mode = preemption_mode
        self.reclaim = reclaim  # frees pinned GPU blocks; True if it freed any
        self.swap_is_cheaper = swap_is_cheaper  # (computed tokens) -> reload beats recompute
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.loading: dict[str, Sequence] = {}
        self._loading_refs: dict[str, list[BlockRef]] = {}
        self._abandoned_loads: set[str] = set()  # finished while loading: free on arrival
        self._remote_found: dict[str, set[bytes]] = {}
        self._probing: dict[str, list[bytes]] = {}  # remote lookups in flight: their keys
        self._swapped: set[str] = set()
        self.num_preemptions = 0
        self.num_swaps = 0
        self.num_tier_hit_tokens = 0

    @property
    def tiers(self) -> TierManager | None:
        return self.kv.tiers

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        tiers = self.tiers
        if tiers is not None and tiers.remote is not None and self.kv.enable_prefix_caching:
            keys = [r.key for r in self.kv.block_refs(seq.token_ids, 0, self.kv.root)]
            if keys:
                self._probing[seq.request_id] = keys
                tiers.probe_remote(seq.request_id, keys)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.loads_in_flight)

    @property
    def loads_in_flight(self) -> bool:
        """Whether the tier mover is still writing any sequence's blocks (live or aborted)."""
        return bool(self.loading or self._abandoned_loads)

    # ---- one step -------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        self._collect_tier_events()
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            if seq.kv is not None:
                n = seq.kv.chunk_limit(seq.num_computed, n)
            slots = seq.num_kv_slots + n + self._spare_blocks(seq, n) * self.kv.block_size
            while not self.kv.grow(seq.request_id, slots):
                if self.reclaim is not None and self.reclaim():
                    continue
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

        if not preempted:
            budget = self._admit(budget, chunks)
        return StepPlan(tuple(chunks), tuple(preempted))

    def _admit(self, budget: int, chunks: list[ScheduledChunk]) -> int:
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) + len(self.loading) >= self.config.max_num_seqs:
                break
            if seq.request_id in self._probing:
                continue  # its remote lookup is in flight; later arrivals may go first
            match = self.kv.match_prefix(self._matchable(seq))
            refs = self._tier_hits(seq, match)
            if refs:
                num_tokens = (len(match.block_ids) + len(refs)) * self.kv.block_size
                if not self._admit_blocks(seq, match, num_tokens):
                    break
                table = self.kv.block_table(seq.request_id)
                first = len(match.block_ids)
                self._start(seq, match)
                self.loading[seq.request_id] = seq
                self._loading_refs[seq.request_id] = refs
                assert self.tiers is not None
                self.tiers.start_load(seq.request_id, refs, table[first : first + len(refs)])
                continue
            n = min(seq.num_tokens - match.num_tokens, budget)
            spare = 0
            if seq.kv is not None:
                n = seq.kv.chunk_limit(match.num_tokens, n)
                budgets = seq.kv.budgets_after(match.num_tokens + n)
                if budgets is not None:  # matched blocks already held elsewhere get copied
                    head = match.block_ids[: self.kv.blocks_for(max(budgets))]
                    spare = sum(1 for b in head if self.kv.pool.refcount[b] > 0)
            slots = match.num_tokens + n + spare * self.kv.block_size
            if not self._admit_blocks(seq, match, slots):
                break
            self._start(seq, match)
            self.running.append(seq)
            self._release_swap(seq)
            chunks.append(
                ScheduledChunk(seq, seq.num_computed, n, self.kv.block_table(seq.request_id))
            )
            budget -= n
        return budget

    def _admit_blocks(self, seq: Sequence, match: PrefixMatch, num_tokens: int) -> bool:
        while True:
            if self.kv.admit(seq.request_id, match, num_tokens, num_prompt=seq.num_tokens):
                return True
            if self.reclaim is None or not self.reclaim():
                return False
            match = self.kv.match_prefix(self._matchable(seq))  # released pins may change it

    def _start(self, seq: Sequence, match: PrefixMatch) -> None:
        self.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        seq.num_computed = match.num_tokens
        if seq.num_cached_tokens < 0:
            seq.num_cached_tokens = match.num_tokens

    def _tier_hits(self, seq: Sequence, match: PrefixMatch) -> list[BlockRef]:
        """The leading blocks after the GPU match that some tier holds."""
        tiers = self.tiers
        if tiers is None or not self.kv.enable_prefix_caching:
            return []
        parent = match.keys[-1] if match.keys else self.kv.root
        refs = self.kv.block_refs(self._matchable(seq), len(match.block_ids), parent)
        if not refs:
            return []
        found = tiers.find_local([r.key for r in refs])
        remote = self._remote_found.get(seq.request_id, set())
        n = 0
        while n < len(refs) and (found[n] or refs[n].key in remote):
            n += 1
        return refs[:n]

    def _matchable(self, seq: Sequence) -> list[int]:
        """The tokens a prefix hit may cover: under a KV policy, not the queries it observes."""
        if seq.kv is None:
            return seq.token_ids
        return seq.token_ids[: seq.kv.first_observed_token() + 1]  # one token left to compute

    def _spare_blocks(self, seq: Sequence, n: int) -> int:
        """Blocks a compaction right after this chunk must copy shared head blocks into."""
        if seq.kv is None:
            return 0
        budgets = seq.kv.budgets_after(seq.num_computed + n)
        if budgets is None:
            return 0
        return self.kv.cow_reserve(seq.request_id, self.kv.blocks_for(max(budgets)))

    def _collect_tier_events(self) -> None:
        if self.tiers is None:
            return
        for event in self.tiers.poll():
            if isinstance(event, ProbeDone):
                keys = self._probing.pop(event.seq_id, None)
                if keys is not None:  # else it finished meanwhile
                    self._remote_found[event.seq_id] = {
                        k for k, hit in zip(keys, event.found, strict=True) if hit
                    }
            elif isinstance(event, LoadDone):
                self._finish_load(event)

    def _finish_load(self, event: LoadDone) -> None:
        if event.seq_id in self._abandoned_loads:
            self._abandoned_loads.discard(event.seq_id)
            self._loading_refs.pop(event.seq_id, None)
            self.kv.free(event.seq_id)
            return
        seq = self.loading.pop(event.seq_id)
        refs = self._loading_refs.pop(event.seq_id)
        first = seq.num_computed // self.kv.block_size
        self.kv.mark_loaded(seq.request_id, refs[: event.num_loaded])
        seq.num_computed += event.num_loaded * self.kv.block_size
        self.num_tier_hit_tokens += event.num_loaded * self.kv.block_size
        if seq.num_cached_tokens >= 0 and seq.num_cached_tokens == first * self.kv.block_size:
            seq.num_cached_tokens = seq.num_computed
        self._release_swap(seq)
        self.running.append(seq)

    # ---- preemption -------------------------------------------------------------------------

    def preempt(self, seq: Sequence) -> None:
        """Preempt a running sequence now: its blocks are freed and it is recomputed later."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._preempt(seq)

    def _preempt(self, seq: Sequence) -> None:
        if self._should_swap(seq):
            assert self.tiers is not None
            self.tiers.hold(f"swap:{seq.request_id}", self.kv.keys_of(seq.request_id))
            self._swapped.add(seq.request_id)
            self.num_swaps += 1
        self.kv.free(seq.request_id)
        seq.num_computed = 0
        if seq.kv is not None:
            seq.kv.reset()  # recomputed from the start, compressed again on the way
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _should_swap(self, seq: Sequence) -> bool:
        if self.tiers is None or self.preemption_mode == "recompute" or seq.kv is not None:
            return False  # a policy's compressed blocks are never stored in the tiers
        if self.preemption_mode == "swap":
            return True
        # auto: the engine's cost model compares reloading the blocks with recomputing them
        return self.swap_is_cheaper is not None and self.swap_is_cheaper(seq.num_computed)

    def _release_swap(self, seq: Sequence) -> None:
        if seq.request_id in self._swapped:
            self._swapped.discard(seq.request_id)
            assert self.tiers is not None
            self.tiers.release(f"swap:{seq.request_id}")

    # ---- after the step ----------------------------------------------------------------------

    def update(self, plan: StepPlan, sampled: list[int], computed: Any = None) -> list[Sequence]:
        """Record the step's computed tokens and append sampled ones, in chunk order.

        `computed` (a CUDA event after the step's kernels, or None on CPU) orders the
        write-through of the blocks this step filled behind the kernels that wrote them.
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
        if self.tiers is not None:
            stored = self.kv.take_newly_indexed()
            self.tiers.store([r for _, r in stored], [b for b, _ in stored], after=computed)
        return got_token

    def finish(self, seq: Sequence, reason: str) -> None:
        """Stop a sequence and free its blocks at once, wherever it is.

        A sequence still loading keeps its blocks until the load lands (the mover is
        writing them), then they are freed.
        """
        self._probing.pop(seq.request_id, None)
        self._remote_found.pop(seq.request_id, None)
        self._release_swap(seq)
        if seq.request_id in self.loading:
            del self.loading[seq.request_id]
            self._abandoned_loads.add(seq.request_id)
        else:
            if seq.status is SequenceStatus.RUNNING:
                self.running.remove(seq)
            elif seq.status is SequenceStatus.WAITING:
                self.waiting.remove(seq)
            self.kv.free(seq.request_id)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
