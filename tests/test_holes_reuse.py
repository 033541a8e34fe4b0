"""Reuse around holes: with a middle block of a cached prefix evicted, the blocks after it
are kept, only the hole is computed (counted in query tokens), and the outputs equal a
full recompute. Blocks of 4 tokens throughout."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from strata import LLM, SamplingParams
from strata.kv.manager import KVManager
from tests.conftest import assert_no_leaks

KW: dict[str, Any] = {"device": "cpu", "block_size": 4, "max_model_len": 64}
GREEDY = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
BASE = [random.Random(7).randrange(3, 512) for _ in range(25)]  # 6 full blocks + 1 token
TAIL = [501, 502, 503, 504, 505]  # B = BASE + TAIL: 30 tokens


@pytest.fixture(scope="module")
def folder(tiny_models: dict[str, Any]) -> Path:
    return tiny_models["llama-gqa"][0]


@pytest.fixture(scope="module")
def recomputed(folder: Path) -> list[int]:
    plain = LLM(str(folder), num_kv_blocks=32, enable_prefix_caching=False, **KW)
    return plain.generate([BASE + TAIL], GREEDY, use_tqdm=False)[0].token_ids


def _evict(llm: LLM, tokens: list[int], indices: Iterable[int]) -> None:
    """Evict these blocks of the cached `tokens` from the GPU pool (they are free)."""
    kv = llm.engine.kv
    match = kv.match_prefix(tokens, holes=True)
    where = dict(enumerate(match.block_ids)) | dict(match.ahead)
    for i in indices:
        kv.evict_cached(where[i])


def _computed(llm: LLM, run: Callable[[], Any]) -> tuple[Any, int]:
    """What `run` returns, and the query tokens the model computed meanwhile."""
    runner = llm.engine.runner
    runner.step_log = []
    try:
        out = run()
        return out, sum(s.tokens for s in runner.step_log)
    finally:
        runner.step_log = None


def _cached_base(folder: Path, **kw: Any) -> LLM:
    llm = LLM(str(folder), **{"num_kv_blocks": 32, **KW, **kw})
    llm.generate([BASE], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    return llm


@pytest.mark.parametrize(
    ("holes", "max_batch", "computed"),
    [
        # blocks 0 1 | 2 | 3 4 5 kept: the hole's 4 tokens, 6 new ones, 4 decode steps
        ([2], 2048, 4 + 6 + 4),
        ([0, 3], 2048, 8 + 6 + 4),  # a leading hole and a middle one
        ([2, 4], 3, 8 + 6 + 4),  # chunks of 3: the hole is computed in two steps
    ],
)
def test_only_the_holes_are_computed(
    folder: Path, recomputed: list[int], holes: list[int], max_batch: int, computed: int
) -> None:
    llm = _cached_base(folder, max_num_batched_tokens=max_batch)
    _evict(llm, BASE, holes)
    before = llm.stats()["prefix_cache_hit_tokens"]
    out, n = _computed(llm, lambda: llm.generate([BASE + TAIL], GREEDY, use_tqdm=False)[0])
    assert out.token_ids == recomputed
    assert n == computed
    reused = 4 * (6 - len(holes))
    assert out.num_cached_tokens == reused
    assert llm.stats()["prefix_cache_hit_tokens"] - before == reused
    # The holes were indexed again: all six blocks are one leading run now.
    assert len(llm.engine.kv.match_prefix(BASE).block_ids) == 6
    assert_no_leaks(llm)


def test_without_reuse_everything_after_the_hole_is_computed(
    folder: Path, recomputed: list[int]
) -> None:
    llm = _cached_base(folder, kv_reuse_holes=False)
    _evict(llm, BASE, [2])
    out, n = _computed(llm, lambda: llm.generate([BASE + TAIL], GREEDY, use_tqdm=False)[0])
    assert out.token_ids == recomputed
    assert n == 30 - 8 + 4
    assert_no_leaks(llm)


def test_a_hole_in_the_cpu_tier_is_loaded(folder: Path, recomputed: list[int]) -> None:
    llm = _cached_base(folder, kv_cpu_memory=0.01)
    assert llm.engine.tiers is not None
    llm.engine.tiers.flush()  # BASE's blocks are written through to the cpu tier
    _evict(llm, BASE, [2])
    out, n = _computed(llm, lambda: llm.generate([BASE + TAIL], GREEDY, use_tqdm=False)[0])
    assert out.token_ids == recomputed
    assert n == 6 + 4  # the hole was loaded; blocks 3..5 stayed on the GPU
    stats = llm.stats()
    assert stats["kv_tier_blocks_loaded"] == 1
    assert out.num_cached_tokens == 24
    assert_no_leaks(llm)


@pytest.mark.parametrize(
    ("gpu_evicted", "loaded"),
    [
        ([2, 3, 4, 5], 3),  # blocks 2, 4, 5 loaded around block 3, missing everywhere
        ([2, 3, 5], 2),  # 2 and 5 loaded, 4 kept on the GPU, 3 computed
    ],
)
def test_tier_blocks_are_loaded_around_a_hole(
    folder: Path, recomputed: list[int], gpu_evicted: list[int], loaded: int
) -> None:
    llm = _cached_base(folder, kv_cpu_memory=0.01)
    tiers = llm.engine.tiers
    assert tiers is not None
    tiers.flush()
    _evict(llm, BASE, gpu_evicted)
    tiers.cpu.remove([llm.engine.kv.block_refs(BASE, 0, llm.engine.kv.root)[3].key])
    out, n = _computed(llm, lambda: llm.generate([BASE + TAIL], GREEDY, use_tqdm=False)[0])
    assert out.token_ids == recomputed
    assert n == 4 + 6 + 4  # block 3, the new tokens, the decode steps
    stats = llm.stats()
    assert stats["kv_tier_blocks_loaded"] == loaded
    assert stats["prefix_cache_tier_hit_tokens"] == 4 * loaded
    assert out.num_cached_tokens == 20
    assert len(llm.engine.kv.match_prefix(BASE).block_ids) == 6
    assert_no_leaks(llm)


@pytest.mark.parametrize("ending", ["preempt", "abort"])
def test_preempted_or_aborted_inside_a_hole(
    folder: Path, recomputed: list[int], ending: str
) -> None:
    llm = _cached_base(folder, max_num_batched_tokens=2)
    _evict(llm, BASE, [2])
    engine = llm.engine
    rid = engine.add_request(BASE + TAIL, GREEDY)
    engine.step()  # tokens 8, 9 of the hole
    seq = next(s for s in engine.scheduler.running if s.request_id == rid)
    assert seq.num_computed == 10
    assert engine.kv.hole_end(rid) == 12
    if ending == "abort":
        engine.abort(rid)
        assert_no_leaks(llm)
        return
    engine.scheduler.preempt(seq)
    engine.check_integrity()
    tokens: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens = out.token_ids
    assert tokens == recomputed
    assert_no_leaks(llm)


def test_manager_keeps_blocks_after_a_hole() -> None:
    kv = KVManager(num_blocks=8, block_size=2, root=b"r", reuse_holes=True)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]  # blocks 0..3 full, one token left
    assert kv.admit("a", kv.match_prefix(prompt), 9, num_prompt=9)
    assert kv.block_table("a") == [0, 1, 2, 3, 4]
    kv.commit("a", prompt, 9)
    kv.free("a")
    kv.evict_cached(1)  # free: 5 6 7 4 3 2 1 0 -> block 1's KV is gone
    match = kv.match_prefix(prompt, holes=True)
    assert (match.block_ids, match.ahead) == ((0,), ((2, 2), (3, 3)))
    assert kv.match_prefix(prompt).ahead == ()  # without holes: the leading run only
    assert kv.admit("b", match, 3, num_prompt=9)
    # The hole (block 1) takes the front free block; 2 and 3 are kept in place.
    assert kv.block_table("b") == [0, 5, 2, 3]
    assert kv.pool.free_order() == [6, 7, 4, 1]
    assert kv.hole_end("b") == 4
    kv.check_integrity()
    assert kv.skip_reused("b", 3) == 3  # mid-hole: no jump
    assert kv.skip_reused("b", 4) == 8  # the hole is filled: past blocks 2 and 3
    assert kv.hole_end("b") is None
    kv.commit("b", prompt, 8)
    assert kv.keys_of("b") == [kv.index.key_of(b) for b in (0, 5, 2, 3)]
    kv.check_integrity()
    kv.free("b")
    kv.check_integrity()


def test_two_requests_fill_the_same_hole_in_one_step(folder: Path) -> None:
    # Both compute block 2 into blocks of their own; the first to commit indexes it, the
    # other's copy stays unindexed and is freed as an empty block.
    prompts = [BASE + TAIL, BASE + TAIL[::-1]]
    plain = LLM(str(folder), num_kv_blocks=32, enable_prefix_caching=False, **KW)
    want = [o.token_ids for o in plain.generate(prompts, GREEDY, use_tqdm=False)]
    llm = _cached_base(folder)
    _evict(llm, BASE, [2])
    outs, n = _computed(llm, lambda: llm.generate(prompts, GREEDY, use_tqdm=False))
    assert [o.token_ids for o in outs] == want
    assert n == 2 * (4 + 6 + 4)
    assert len(llm.engine.kv.match_prefix(BASE).block_ids) == 6
    assert_no_leaks(llm)
