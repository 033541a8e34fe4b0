"""The Scheduler on a bare KVManager, no model: exact chunks, block ids and free-list order.

Block size 4 throughout. Each step the test plays the engine: schedule, then (unless the
plan is empty) update with one sampled token per sampling chunk.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from strata.config import SchedulerConfig
from strata.engine.overlap import sampling_seqs
from strata.engine.plan import StepPlan
from strata.engine.sampling_params import SamplingParams
from strata.engine.scheduler import Scheduler
from strata.engine.sequence import Sequence, SequenceStatus
from strata.kv.manager import KVManager
from strata.kv.prefix import BlockRef, root_key
from strata.kv.tiers.jobs import LoadDone
from strata.kv.tiers.load_tracker import TierLoadTracker
from strata.kv.tiers.loads import NoTierLoads

ROOT = root_key("test-model", "fp32/bs4")
BS = 4
Chunk = tuple[str, int, int, list[int]]


def _seq(request_id: str, prompt: Seq[int]) -> Sequence:
    return Sequence(request_id, None, list(prompt), SamplingParams(), seed=0, max_tokens=64)


def _scheduler(num_blocks: int, budget: int, max_seqs: int = 8) -> Scheduler:
    kv = KVManager(num_blocks, BS, ROOT)
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs)
    return Scheduler(config, kv, NoTierLoads())


def _step(sched: Scheduler, token: int = 100) -> tuple[list[Chunk], StepPlan]:
    """One engine step; returns (id, start, end, block table) of each chunk, and the plan."""
    plan = sched.schedule()
    chunks = [(c.seq.request_id, c.start, c.end, list(c.block_table)) for c in plan.chunks]
    if not plan.is_empty:
        sched.record_computed(plan)
        rows = list(sampling_seqs(plan))
        sched.append_tokens(rows, [token] * len(rows))
    sched.kv.check_integrity()
    return chunks, plan


def test_chunked_prefill_under_a_small_budget_mixes_with_decode() -> None:
    sched = _scheduler(num_blocks=16, budget=6)
    a, b = _seq("a", range(1, 11)), _seq("b", range(20, 27))  # 10 and 7 tokens
    sched.add(a)
    assert _step(sched)[0] == [("a", 0, 6, [0, 1])]
    assert a.num_tokens == 10 and a.num_computed == 6
    sched.add(b)
    # a finishes its prompt (4 tokens) and samples; b gets the 2 tokens of budget left.
    assert _step(sched, 101)[0] == [("a", 6, 10, [0, 1, 2]), ("b", 0, 2, [3])]
    assert a.output_token_ids == [101] and b.output_token_ids == []
    # a decodes one token; b takes the rest of its prompt (5 of the 5 left) and samples.
    assert _step(sched, 102)[0] == [("a", 10, 11, [0, 1, 2]), ("b", 2, 7, [3, 4])]
    assert _step(sched, 103)[0] == [("a", 11, 12, [0, 1, 2]), ("b", 7, 8, [3, 4])]
    # a's 13th token needs a fourth block, b's 9th a third one.
    assert _step(sched, 104)[0] == [("a", 12, 13, [0, 1, 2, 5]), ("b", 8, 9, [3, 4, 6])]
    assert a.output_token_ids == [101, 102, 103, 104]
    assert sched.kv.num_free_blocks == 16 - 7
    assert sched.num_preemptions == 0


def test_a_budget_of_one_runs_the_oldest_first() -> None:
    sched = _scheduler(num_blocks=8, budget=1)
    a, b = _seq("a", [1, 2]), _seq("b", [3, 4])
    sched.add(a)
    sched.add(b)
    assert _step(sched)[0] == [("a", 0, 1, [0])]
    assert _step(sched)[0] == [("a", 1, 2, [0])]
    assert _step(sched)[0] == [("a", 2, 3, [0])]  # b waits while a takes the whole budget
    assert list(sched.waiting) == [b]


def test_max_num_seqs_bounds_admission() -> None:
    sched = _scheduler(num_blocks=8, budget=64, max_seqs=1)
    a, b = _seq("a", [1, 2, 3]), _seq("b", [4, 5, 6])
    sched.add(a)
    sched.add(b)
    assert _step(sched)[0] == [("a", 0, 3, [0])]
    sched.finish(a, "stop")
    assert _step(sched)[0] == [("b", 0, 3, [1])]  # never-used blocks come before a's
    assert a.status is SequenceStatus.FINISHED and a.finish_reason == "stop"


def _two_decoding(sched: Scheduler) -> tuple[Sequence, Sequence]:
    """a and b, 8-token prompts, prefilled together and decoded until the pool is full."""
    a, b = _seq("a", range(1, 9)), _seq("b", range(11, 19))
    sched.add(a)
    sched.add(b)
    assert _step(sched)[0] == [("a", 0, 8, [0, 1]), ("b", 0, 8, [2, 3])]
    assert _step(sched)[0] == [("a", 8, 9, [0, 1, 4]), ("b", 8, 9, [2, 3, 5])]
    assert _step(sched)[0] == [("a", 9, 10, [0, 1, 4]), ("b", 9, 10, [2, 3, 5])]
    assert _step(sched)[0] == [("a", 10, 11, [0, 1, 4]), ("b", 10, 11, [2, 3, 5])]
    assert _step(sched)[0] == [("a", 11, 12, [0, 1, 4]), ("b", 11, 12, [2, 3, 5])]
    assert sched.kv.num_free_blocks == 0
    return a, b


def test_preemption_frees_the_most_recently_admitted_and_keeps_its_prefix_cached() -> None:
    sched = _scheduler(num_blocks=6, budget=64)
    a, b = _two_decoding(sched)
    # a's 13th token needs a fourth block: b (admitted last) is preempted. Its blocks are
    # released last block first, and a takes the front of the free list (evicting the
    # cached KV of b's third block).
    chunks, plan = _step(sched)
    assert chunks == [("a", 12, 13, [0, 1, 4, 5])]
    assert plan.preempted == (b,)
    assert sched.kv.pool.free_order() == [3, 2]
    assert list(sched.waiting) == [b] and b.status is SequenceStatus.WAITING
    assert b.num_computed == 0 and b.num_tokens == 13
    assert sched.num_preemptions == 1
    # b's first two blocks are still cached but free: reviving them plus two new blocks
    # needs four free blocks, and there are two. b waits; no one else is preempted.
    chunks, plan = _step(sched)
    assert chunks == [("a", 13, 14, [0, 1, 4, 5])] and plan.preempted == ()
    sched.finish(a, "length")
    assert sched.kv.pool.free_order() == [3, 2, 5, 4, 1, 0]
    # b comes back: a GPU prefix hit on blocks 2 and 3, recomputing only its tail.
    assert _step(sched)[0] == [("b", 8, 13, [2, 3, 5, 4])]
    assert sched.kv.pool.free_order() == [1, 0]
    assert b.num_cached_tokens == 0  # the hit at its first admission
    assert sched.kv.stats()["prefix_cache_hit_tokens"] == 8


def test_preempting_the_sequence_being_grown_stops_the_step() -> None:
    sched = _scheduler(num_blocks=3, budget=64)
    a = _seq("a", range(1, 9))
    sched.add(a)
    assert _step(sched)[0] == [("a", 0, 8, [0, 1])]
    assert _step(sched)[0] == [("a", 8, 9, [0, 1, 2])]
    for end in (10, 11, 12):
        assert _step(sched)[0] == [("a", end - 1, end, [0, 1, 2])]
    chunks, plan = _step(sched)  # a needs a fourth block: it is its own victim
    assert chunks == [] and plan.preempted == (a,)
    assert sched.kv.pool.free_order() == [2, 1, 0] and list(sched.waiting) == [a]


def test_prefix_hits_share_blocks_and_leave_one_token_to_compute() -> None:
    sched = _scheduler(num_blocks=8, budget=64)
    prompt = list(range(1, 10))  # 9 tokens: two full blocks and one open
    a = _seq("a", prompt)
    sched.add(a)
    assert _step(sched)[0] == [("a", 0, 9, [0, 1, 2])]
    b = _seq("b", [*prompt[:8], 50, 51, 52])
    sched.add(b)
    assert _step(sched)[0] == [("a", 9, 10, [0, 1, 2]), ("b", 8, 11, [0, 1, 3])]
    assert sched.kv.pool.refcount[:4] == [2, 2, 1, 1]
    assert b.num_cached_tokens == 8
    sched.finish(a, "stop")
    sched.finish(b, "stop")
    assert sched.kv.pool.free_order() == [4, 5, 6, 7, 2, 3, 1, 0]
    # A prompt of exactly two blocks reuses only the first: its last token is computed.
    c = _seq("c", prompt[:8])
    sched.add(c)
    assert _step(sched)[0] == [("c", 4, 8, [0, 4])]
    assert sched.kv.pool.free_order() == [5, 6, 7, 2, 3, 1]
    assert c.num_cached_tokens == 4


# ---- with tiers: the scheduler through TierLoadTracker over a fake TierManager -------------


class FakeTiers:
    """Holds `keys` in a local tier; a load lands whole at the next poll. Records calls."""

    remote = None

    def __init__(self, keys: Seq[bytes] = ()) -> None:
        self.keys = set(keys)
        self.loads: list[tuple[str, list[bytes], list[int]]] = []
        self.stored: list[list[int]] = []
        self.holds: list[tuple[str, str, int]] = []
        self._pending: list[LoadDone] = []

    def find_local(self, keys: Seq[bytes]) -> list[bool]:
        return [k in self.keys for k in keys]

    def start_load(self, seq_id: str, blocks: Seq[BlockRef], block_ids: Seq[int]) -> None:
        self.loads.append((seq_id, [b.key for b in blocks], list(block_ids)))
        self._pending.append(LoadDone(seq_id, len(blocks)))

    def poll(self) -> list[LoadDone]:
        out, self._pending = self._pending, []
        return out

    def store(self, blocks: Seq[BlockRef], block_ids: Seq[int], after: Any = None) -> None:
        if blocks:
            self.stored.append(list(block_ids))

    def before_overwrite(self, block_id: int) -> None:
        pass

    def hold(self, owner: str, keys: Seq[bytes]) -> None:
        self.holds.append(("hold", owner, len(keys)))

    def release(self, owner: str) -> None:
        self.holds.append(("release", owner, 0))


def _tiered(tiers: FakeTiers, num_blocks: int, preemption_mode: str = "recompute") -> Scheduler:
    kv = KVManager(num_blocks, BS, ROOT, tiers=tiers)
    loads = TierLoadTracker(tiers, kv, preemption_mode)  # type: ignore[arg-type]
    return Scheduler(SchedulerConfig(max_num_batched_tokens=64), kv, loads)


def test_a_tier_hit_loads_before_the_sequence_runs() -> None:
    prompt = list(range(1, 13))  # 12 tokens: blocks 0 and 1 may come from a tier
    refs = KVManager(1, BS, ROOT).block_refs(prompt, 0, ROOT)
    tiers = FakeTiers([r.key for r in refs])
    sched = _tiered(tiers, num_blocks=8)
    a = _seq("a", prompt)
    sched.add(a)
    chunks, plan = _step(sched)
    assert chunks == [] and plan.is_empty  # a waits for its load, in its own two blocks
    assert tiers.loads == [("a", [r.key for r in refs], [0, 1])]
    assert dict(sched.loading) == {"a": a} and not sched.running and sched.has_unfinished()
    # The load lands: a computes only its last block, whose KV is written through.
    assert _step(sched)[0] == [("a", 8, 12, [0, 1, 2])]
    assert tiers.stored == [[2]]  # the loaded blocks are not written back down
    assert a.num_cached_tokens == 8
    assert sched.tier_loads.stats() == {
        "prefix_cache_tier_hit_tokens": 8, "num_swaps": 0, "num_loading": 0,
    }  # fmt: skip


def test_finishing_a_loading_sequence_frees_its_blocks_when_the_load_lands() -> None:
    prompt = list(range(1, 10))
    tiers = FakeTiers([r.key for r in KVManager(1, BS, ROOT).block_refs(prompt, 0, ROOT)])
    sched = _tiered(tiers, num_blocks=8)
    a = _seq("a", prompt)
    sched.add(a)
    _step(sched)
    sched.finish(a, "abort")
    assert sched.kv.has("a") and sched.tier_loads.in_flight and sched.has_unfinished()
    assert _step(sched)[0] == []
    assert not sched.kv.has("a") and not sched.has_unfinished()
    assert sched.kv.pool.free_order() == [2, 3, 4, 5, 6, 7, 1, 0]


def test_swap_preemption_holds_the_victims_blocks_until_it_runs_again() -> None:
    tiers = FakeTiers()
    sched = _tiered(tiers, num_blocks=6, preemption_mode="swap")
    a, b = _two_decoding(sched)
    assert tiers.stored == [[0, 1, 2, 3], [4, 5]]  # full blocks, written through once each
    _, plan = _step(sched)
    assert plan.preempted == (b,)
    assert tiers.holds == [("hold", "swap:b", 3)]  # b's three full computed blocks
    _step(sched)
    sched.finish(a, "length")
    assert _step(sched)[0] == [("b", 8, 13, [2, 3, 5, 4])]
    assert tiers.holds == [("hold", "swap:b", 3), ("release", "swap:b", 0)]
    assert sched.tier_loads.stats()["num_swaps"] == 1
