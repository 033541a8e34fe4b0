"""Prefix caching: exact hit counts, block ids and free-list order; no leaks."""

from __future__ import annotations

from typing import Any

from strata import LLM, SamplingParams
from tests.conftest import assert_no_leaks

SHARED = [11, 12, 13, 14, 15, 16, 17, 18]  # two full blocks of 4


def _blocks_of(llm: LLM, request_id: str) -> list[int]:
    return list(llm.engine.kv.block_table(request_id))


def test_shared_prefix_reuses_exact_blocks(tiny_models: dict[str, Any]) -> None:
    folder, _ = tiny_models["llama"]
    llm = LLM(str(folder), device="cpu", num_kv_blocks=12, block_size=4, max_model_len=32)
    engine = llm.engine
    greedy = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)

    # A: 10 prompt tokens -> blocks 0, 1, 2. Blocks 0, 1 are full after prefill; block 2
    # fills when its 12th token is computed. Freed tail first: 2, 1, 0.
    a = engine.add_request([*SHARED, 20, 21], greedy)
    engine.step()
    assert _blocks_of(llm, a) == [0, 1, 2]
    while engine.has_unfinished():
        engine.step()
    assert engine.kv.pool.free_order() == [3, 4, 5, 6, 7, 8, 9, 10, 11, 2, 1, 0]
    assert llm.stats()["kv_blocks_cached"] == 3

    # B shares A's first two blocks: it revives 0 and 1 and takes block 3 from the front.
    b = engine.add_request([*SHARED, 30, 31, 32], SamplingParams(max_tokens=2, temperature=0))
    engine.step()
    assert _blocks_of(llm, b) == [0, 1, 3]
    assert engine.kv.pool.free_order() == [4, 5, 6, 7, 8, 9, 10, 11, 2]
    stats = llm.stats()
    assert stats["prefix_cache_queried_tokens"] == 10 + 11
    assert stats["prefix_cache_hit_tokens"] == 8
    while engine.has_unfinished():
        engine.step()
    assert engine.kv.pool.free_order() == [4, 5, 6, 7, 8, 9, 10, 11, 2, 3, 1, 0]
    assert llm.stats()["kv_blocks_cached"] == 4
    assert_no_leaks(llm)


def test_cached_output_equals_recomputed(tiny_models: dict[str, Any]) -> None:
    folder, _ = tiny_models["llama-gqa"]
    prompts = [[*SHARED, 40 + i, 50 + i, 60 + i] for i in range(3)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    cached = LLM(
        str(folder), device="cpu", num_kv_blocks=32, block_size=4, max_num_seqs=1, max_model_len=64
    )
    plain = LLM(
        str(folder),
        device="cpu",
        num_kv_blocks=32,
        block_size=4,
        max_model_len=64,
        enable_prefix_caching=False,
    )
    hits = [o.token_ids for o in cached.generate(prompts, params)]
    assert hits == [o.token_ids for o in plain.generate(prompts, params)]
    assert cached.stats()["prefix_cache_hit_tokens"] == 2 * 8
    for o in cached.generate(prompts[:1], params):
        assert o.num_cached_tokens == 8
    assert_no_leaks(cached)
    assert_no_leaks(plain)


def test_lru_eviction_of_cached_blocks(tiny_models: dict[str, Any]) -> None:
    folder, _ = tiny_models["llama"]
    llm = LLM(str(folder), device="cpu", num_kv_blocks=8, block_size=4, max_model_len=32)
    params = SamplingParams(max_tokens=1, temperature=0)
    llm.generate([[*SHARED, 1]], params)  # SHARED cached in blocks 0, 1; free: 3..7, 2, 1, 0
    assert llm.engine.kv.pool.free_order() == [3, 4, 5, 6, 7, 2, 1, 0]
    # 28 unrelated tokens need 7 blocks: 3..7 and 2, then block 1, SHARED's tail block.
    llm.generate([list(range(100, 128))], params)
    assert llm.stats()["kv_blocks_cached"] == 1 + 7
    out = llm.generate([[*SHARED, 1]], params)[0]
    assert out.num_cached_tokens == 4  # the head block survived; the tail was evicted first
    assert_no_leaks(llm)
