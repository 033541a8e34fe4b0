"""The tiers' eviction orders on one scripted cpu-tier trace, with the exact keys each
evicts in order: lru, and cost (the GPU pool's value model over the block's position)."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from strata import LLM, SamplingParams
from strata.kv.tiers.base import BlockLayout, StoredBlock
from strata.kv.tiers.cpu import CPUTier
from tests.conftest import assert_no_leaks

LAYOUT = BlockLayout("ab" * 32, 1, 1, 2, 2, "float32")  # 32-byte blocks of 2 tokens


def block(name: str, position: int | None) -> StoredBlock:
    payload = torch.full((LAYOUT.nbytes,), len(name), dtype=torch.uint8)
    return StoredBlock(name.encode(), (0, 0), payload, position)


def run_trace(eviction: str) -> tuple[list[str], list[str]]:
    """Four slots, slope 1: prefix p0..p3 is stored and its head p0 read back; with p1
    pinned, q0, q1 (another prefix) and x0 push blocks out; then y (position unknown)
    after p1's unpin. Returns the keys evicted, in order, and the keys kept."""
    tier = CPUTier(LAYOUT, 4 * LAYOUT.nbytes, pin_memory=False, eviction=eviction, slope=1.0)
    evicted: list[str] = []
    drop = tier._drop

    def recording_drop(key: bytes) -> None:
        evicted.append(key.decode())
        drop(key)

    tier._drop = recording_drop  # type: ignore[method-assign]
    tier.put([block(f"p{j}", j) for j in range(4)])
    assert tier.get([b"p0"])[0] is not None
    tier.pin([b"p1"])  # a pinned key is skipped, never evicted
    tier.put([block("q0", 0), block("q1", 1), block("x0", 0)])
    tier.unpin([b"p1"])
    tier.put([block("y", None)])  # position unknown: counts as 0
    assert not tier.check_integrity()
    kept = [k.decode() for k in (b"p0", b"p1", b"p2", b"p3", b"q0", b"q1", b"x0", b"y")
            if tier.contains([k])[0]]  # fmt: skip
    return evicted, kept


@pytest.mark.parametrize(
    ("eviction", "evicted", "kept"),
    [
        # lru: p0's read moved it behind p3; p1 is pinned until y.
        ("lru", ["p2", "p3", "p0", "p1"], ["q0", "q1", "x0", "y"]),
        # cost, values L + uses x (1 + j) (stamp order breaks ties): p1 2, p2 3, p3 4,
        # p0 2 after its read. q0 evicts p0 (p1 pinned), L = 2, q0 = 3; q1 evicts p2
        # (3, older than q0), L = 3, q1 = 5; x0 evicts q0 (3), x0 = 4; y evicts p1 (2,
        # unpinned; L stays 3). The late block p3 of the long prefix stays.
        ("cost", ["p0", "p2", "q0", "p1"], ["p3", "q1", "x0", "y"]),
    ],
)
def test_scripted_trace_evicts_in_exact_order(
    eviction: str, evicted: list[str], kept: list[str]
) -> None:
    assert run_trace(eviction) == (evicted, kept)


def test_fifo_ignores_reads() -> None:
    assert run_trace("fifo")[0] == ["p0", "p2", "p3", "p1"]


GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
KW: dict[str, Any] = {"device": "cpu", "block_size": 4, "max_model_len": 48}
BLOCK_BYTES = 2 * 2 * 4 * 2 * 16 * 4  # llama-gqa: layers, k|v, tokens, kv heads, head dim, fp32


def _tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("cpu_blocks", [200, 20])
def test_prefixes_read_back_under_cost_equal_recompute(
    tiny_models: dict[str, Any], cpu_blocks: int
) -> None:
    # Six 41-token prompts (10 full blocks each) through a 16-block pool: a second pass,
    # last prompt first, finds them in the cpu tier (all of them with 200 slots; with 20,
    # those the cost order kept, around holes) and the tokens equal a run without cache.
    folder = str(tiny_models["llama-gqa"][0])
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 512) for _ in range(41)] for _ in range(6)]
    expected = _tokens(LLM(folder, num_kv_blocks=64, enable_prefix_caching=False, **KW), prompts)
    llm = LLM(folder, num_kv_blocks=16, kv_cpu_memory=cpu_blocks * BLOCK_BYTES / 2**30,
              kv_tier_eviction="cost", kv_eviction="cost", **KW)  # fmt: skip
    assert _tokens(llm, prompts) == expected
    llm.engine.kv.evict_all_cached()
    assert _tokens(llm, prompts[::-1]) == expected[::-1]
    stats = llm.stats()
    assert stats["kv_tier_cpu_hits"] > 0
    if cpu_blocks == 200:
        assert stats["prefix_cache_tier_hit_tokens"] == 6 * 40
    else:
        assert stats["kv_tier_cpu_evictions"] > 0
    assert_no_leaks(llm)
    llm.close()
