"""The GPU pool's eviction orders: lru and cost (hit likelihood x recompute cost) on one
scripted trace with the exact blocks each evicts, and the cost order in the engine."""

from __future__ import annotations

import random
from typing import Any

import pytest
from transformers import LlamaConfig

from strata import LLM, SamplingParams
from strata.config import ModelConfig
from strata.kv.manager import KVManager
from strata.kv.pool_order import CostFreeOrder, FreeBlockOrder, LRUFreeOrder, attention_slope
from tests.conftest import assert_no_leaks


def recording(base: type[FreeBlockOrder]) -> FreeBlockOrder:
    """An order of class `base` that lists the cached blocks it lets be evicted."""

    class Recording(base):  # type: ignore[valid-type,misc]
        evicted: list[int]

        def forgotten(self, block_id: int) -> None:
            self.evicted.append(block_id)
            super().forgotten(block_id)

    order = Recording(0.5)
    order.evicted = []
    return order


def run(kv: KVManager, name: str, tokens: list[int]) -> list[int]:
    """Admit, compute and finish one request; its block table."""
    assert kv.admit(name, kv.match_prefix(tokens, holes=True), len(tokens), len(tokens))
    table = list(kv.block_table(name))
    kv.commit(name, tokens, len(tokens))
    kv.free(name)
    kv.check_integrity()
    return table


A = [1, 2, 3, 4, 5, 6, 7, 8, 9]  # blocks of 2: a0..a3 full at positions 0..3, one open
B = [11, 12, 13, 14, 15]  # b0, b1
D = list(range(20, 33))  # six full blocks
F = [40, 41, 42]


@pytest.mark.parametrize(
    ("base", "evicted_by_d", "a_after_d", "evicted_by_f"),
    [
        # lru: the free list, where each request released its tail first
        (LRUFreeOrder, [6, 5, 3, 2, 1], ((0,), ()), [0]),  # A keeps its head a0
        # cost, slope 0.5: values at release (L + uses x (1 + 0.5 j)): b0 1.0, b1 1.5;
        # a0..a3 reused once: 2.0, 3.0, 4.0, 5.0. D evicts the cheapest, L ends at 4.0;
        # then a3 (5.0) ties with D's first block (4.0 + 1.0) and was freed earlier.
        (CostFreeOrder, [5, 6, 0, 1, 2], ((), ((3, 3),)), [3]),  # A keeps a3, past a hole
    ],
)
def test_scripted_trace_evicts_in_exact_order(
    base: type[FreeBlockOrder], evicted_by_d: list[int], a_after_d: tuple[Any, Any],
    evicted_by_f: list[int],
) -> None:  # fmt: skip
    order = recording(base)
    kv = KVManager(num_blocks=8, block_size=2, root=b"r", reuse_holes=True, eviction=order)
    evicted: list[int] = order.evicted  # type: ignore[attr-defined]
    assert run(kv, "a", A) == [0, 1, 2, 3, 4]
    assert run(kv, "b", B) == [5, 6, 7]
    assert run(kv, "c", A) == [0, 1, 2, 3, 4]  # a prefix hit on a0..a3
    assert evicted == []
    run(kv, "d", D)  # seven blocks: two empty ones, then five cached ones are evicted
    assert evicted == evicted_by_d
    match = kv.match_prefix(A, holes=True)
    assert (match.block_ids, match.ahead) == a_after_d
    evicted.clear()
    run(kv, "f", F)  # D's open block (empty), then one cached block
    assert evicted == evicted_by_f


def test_cost_order_keeps_the_value_it_set_at_release() -> None:
    order = CostFreeOrder(slope=0.5)
    kv = KVManager(num_blocks=8, block_size=2, root=b"r", reuse_holes=True, eviction=order)
    run(kv, "a", A)
    assert [order.value(b) for b in (0, 1, 2, 3)] == [1.0, 1.5, 2.0, 2.5]
    run(kv, "c", A)
    assert [order.value(b) for b in (0, 1, 2, 3)] == [2.0, 3.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="slope"):
        CostFreeOrder(slope=-1.0)


def test_attention_slope_of_the_embedded_shape() -> None:
    # SmolLM2-135M: 30 layers, hidden 576, 9 x 64 query dims, 3 KV heads, MLP 1536.
    config = ModelConfig.from_hf(LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
    ))  # fmt: skip
    per_token = 30 * (576 * (576 + 384) + 576 * 576 + 3 * 576 * 1536)
    assert attention_slope(config, 16) == pytest.approx(2 * 16 * 30 * 576 / per_token)


@pytest.mark.parametrize(("eviction", "hit_tokens"), [("lru", 0), ("cost", 24)])
def test_eviction_orders_in_the_engine_equal_recompute(
    tiny_models: dict[str, Any], eviction: str, hit_tokens: int
) -> None:
    # Three 20-token documents asked in turn through a pool that holds two of them: lru
    # evicts each document just before it is asked again; cost keeps the ones reused.
    folder, _ = tiny_models["llama-gqa"]
    rng = random.Random(3)
    docs = [[rng.randrange(3, 512) for _ in range(20)] for _ in range(3)]
    prompts = [docs[i % 3] + [rng.randrange(3, 512) for _ in range(3)] for i in range(9)]
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    kw: dict[str, Any] = {"device": "cpu", "block_size": 4, "max_model_len": 32}
    plain = LLM(str(folder), num_kv_blocks=64, enable_prefix_caching=False, **kw)
    want = [o.token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    llm = LLM(str(folder), num_kv_blocks=14, max_num_seqs=1, kv_eviction=eviction, **kw)
    for prompt, tokens in zip(prompts, want, strict=True):
        assert llm.generate([prompt], params, use_tqdm=False)[0].token_ids == tokens
    assert llm.stats()["prefix_cache_hit_tokens"] == hit_tokens
    assert_no_leaks(llm)


def test_cost_order_follows_withdraw_restore_and_cold_evictions() -> None:
    order = CostFreeOrder(slope=0.5)
    kv = KVManager(num_blocks=8, block_size=2, root=b"r", eviction=order)
    run(kv, "a", A)  # a0..a3 cached in free blocks 0..3
    assert kv.withdraw(2)  # lent (MoE expert slots): evicted, off the free list
    kv.check_integrity()
    assert run(kv, "b", B) == [5, 6, 7]  # empty blocks first, no cached one evicted
    kv.restore(2)
    # Free list (release order): 2 (restored first), 4, 3, 1, 0, 7, 6, 5. Cold eviction
    # empties the cached ones in that order: 3 1 0 6 5, behind 4, 7 and 2.
    assert kv.evict_all_cached() == 5
    kv.check_integrity()
    assert run(kv, "c", A) == [4, 7, 2, 3, 1]  # in the order they became empty
