"""The parts of expert offloading on synthetic experts: eviction order of lru and lfru on
a scripted trace, prefetch precision/recall, the CPU/link split of the cost model, int8/int4
round trips and mixed precision on miss, the arena's block/slot arithmetic, metrics."""

from __future__ import annotations

import pytest
import torch

from strata.kv.manager import KVManager
from strata.models.routed_experts import ExpertWeights, ResidentExperts
from strata.moe.arena import ExpertArena
from strata.moe.boundary import ExpertOffload
from strata.moe.cost_model import OffloadCostModel
from strata.moe.expert_cache import ExpertCache
from strata.moe.host_store import HostExpertStore
from strata.moe.offloaded_experts import OffloadedExperts, OffloadOptions
from strata.moe.policies import make_policy
from strata.moe.quant import dequantize_rows, quantize_rows
from strata.server.metrics import ServerMetrics

E, H, F, K = 4, 8, 6, 2


def weights(layers: int = 2, seed: int = 0) -> list[ExpertWeights]:
    g = torch.Generator().manual_seed(seed)
    return [
        ExpertWeights(i, torch.randn(E, 2 * F, H, generator=g), torch.randn(E, H, F, generator=g))
        for i in range(layers)
    ]


def make_cache(capacity: int, policy: str, low: str = "full", layers: int = 2) -> ExpertCache:
    store = HostExpertStore(weights(layers), low)
    slots = torch.zeros(64, store.expert_numel)
    return ExpertCache(store, lambda j: slots[j], capacity, make_policy(policy, layers),
                       torch.device("cpu"))  # fmt: skip


def touch(cache: ExpertCache, trace: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Access each key (loading on a miss); returns the keys evicted, in order."""
    evicted = []
    for key in trace:
        before = set(cache.slot_of)
        if cache.lookup(key, need_full=True) is None:
            assert cache.load(key) is not None
        evicted.extend(sorted(before - set(cache.slot_of)))
        cache.check_integrity()
    return evicted


def test_lru_evicts_least_recent_across_layers() -> None:
    cache = make_cache(3, "lru")
    trace = [(0, 0), (0, 1), (1, 0), (0, 0), (1, 1), (1, 2), (0, 1)]
    assert touch(cache, trace) == [(0, 1), (1, 0), (0, 0)]


def test_lfru_keeps_each_layer_its_share_and_evicts_the_least_frequent() -> None:
    cache = make_cache(4, "lfru")  # 2 layers: a share of 2 slots each
    # Layer 0 takes all 4 slots while layer 1 is idle; (0, 0) is used 3 times, (0, 1) twice.
    trace = [(0, 0), (0, 0), (0, 1), (0, 0), (0, 1), (0, 2), (0, 3)]
    assert touch(cache, trace) == []
    # Layer 1 is under its share: it takes from layer 0 (over its share), least frequent
    # first, ties broken by least recent use: (0, 2) then (0, 3).
    assert touch(cache, [(1, 0), (1, 1)]) == [(0, 2), (0, 3)]
    # At its share, layer 1 evicts its own least frequent expert, not layer 0's.
    assert touch(cache, [(1, 0), (1, 2)]) == [(1, 1)]
    assert set(cache.slot_of) == {(0, 0), (0, 1), (1, 0), (1, 2)}


def test_pinned_slots_are_never_evicted() -> None:
    cache = make_cache(2, "lru")
    for e in (0, 1):
        slot = cache.load((0, e))
        assert slot is not None
        cache.pin(slot)
    assert cache.load((0, 2)) is None
    cache.release_pins()
    assert cache.load((0, 2)) is not None


class FixedRouter:
    def __init__(self, ids: list[list[int]]) -> None:
        self.ids = torch.tensor(ids)

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ids, torch.full(self.ids.shape, 0.5)


def test_prefetch_precision_and_recall_on_a_scripted_step() -> None:
    cache = make_cache(8, "lru")
    # Layer 1's router, applied to layer 0's input, predicts experts {0, 1} (and 3, row 2).
    routers = {0: FixedRouter([[0, 1]]), 1: FixedRouter([[0, 1], [1, 0], [3, 1]])}
    experts = OffloadedExperts(cache, routers, OffloadOptions(cpu_compute="off"))
    x = torch.randn(3, H)
    w = torch.full((3, K), 0.5)
    experts.prefetch(0, x)
    experts.forward(0, x, torch.tensor([[0, 1], [0, 1], [0, 1]]), w)
    assert experts.counters.prefetch_loads == 3  # 0, 1, 3 copied for layer 1
    # Layer 1 actually routes to {1, 2}: 1 of 3 predicted used, 1 of 2 used predicted.
    experts.prefetch(1, x)  # the last MoE layer: nothing to predict
    out = experts.forward(1, x, torch.tensor([[1, 2], [2, 1], [1, 2]]), w)
    c = experts.counters
    assert (c.predicted, c.correct, c.used_with_prediction) == (3, 1, 2)
    assert c.precision == pytest.approx(1 / 3) and c.recall == pytest.approx(1 / 2)
    assert c.layer(1).prefetch_hits == 1 and c.layer(1).misses == 1
    ref = ResidentExperts(list(cache.store.weights.values()))
    assert torch.equal(out, ref.forward(1, x, torch.tensor([[1, 2], [2, 1], [1, 2]]), w))
    stats = experts.stats()
    assert stats["moe_prefetch_precision"] == pytest.approx(1 / 3)
    # layer 0 misses 0 and 1, the prefetch copies 0, 1, 3 of layer 1, layer 1 misses 2
    assert stats["moe_bytes_moved"] == 6 * cache.store.expert_bytes


def test_cost_model_interpolates_and_balances_the_cpu_against_the_link() -> None:
    model = OffloadCostModel(
        h2d_bytes_per_s=1e9, expert_bytes=10**6, activation_bytes_per_token=0,
        cpu_seconds=((1, 0.0004), (4, 0.0016)),
    )  # fmt: skip
    assert model.copy_seconds() == pytest.approx(0.001)
    assert model.cpu_compute_seconds(2) == pytest.approx(0.0008)
    assert model.cpu_compute_seconds(8) == pytest.approx(0.0032)  # per token beyond
    assert model.max_cpu_tokens() == 2
    experts = OffloadedExperts(make_cache(4, "lru"), {}, OffloadOptions(), model)
    counts = [1, 1, 1, 3]  # expert 3 (3 tokens) is above the cutoff: always copied
    # Fewest tokens first: CPU 0.4 ms < link 1 ms -> CPU; 0.8 < 1 -> CPU; 1.2 > 1 -> link.
    assert experts._split_cpu([0, 1, 2, 3], counts) == [0, 1]


@pytest.mark.parametrize(("bits", "tol"), [(8, 0.01), (4, 0.16)])
def test_quantized_rows_round_trip(bits: int, tol: float) -> None:
    w = torch.randn(16, 32)
    q = quantize_rows(w, bits)
    out = torch.empty_like(w)
    dequantize_rows(q.payload, q.scale, bits, out)
    assert ((out - w).abs().amax(dim=1) <= w.abs().amax(dim=1) * tol).all()


def test_low_importance_misses_load_the_low_precision_copy() -> None:
    cache = make_cache(8, "lru", low="int8")
    experts = OffloadedExperts(
        cache, {0: FixedRouter([[0, 1]])}, OffloadOptions(prefetch=False, cpu_compute="off",
                                                            low_precision_threshold=0.3),
    )  # fmt: skip
    x = torch.randn(2, H)
    ids = torch.tensor([[0, 1], [0, 2]])
    w = torch.tensor([[0.9, 0.1], [0.8, 0.2]])  # experts 1 and 2 are below 0.3 everywhere
    out = experts.forward(0, x, ids, w)
    c = experts.counters.layer(0)
    assert (c.misses, c.low_precision_loads) == (3, 2)
    assert [cache.precision_of(cache.slot_of[(0, e)]) for e in (0, 1, 2)] == [
        "full", "int8", "int8"
    ]  # fmt: skip
    ref = ResidentExperts(list(cache.store.weights.values())).forward(0, x, ids, w)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    # Expert 1 now matters: its int8 copy is replaced by the full one (a miss).
    experts.forward(0, x, torch.tensor([[1, 0]]).expand(2, 2).contiguous(), w)
    assert cache.precision_of(cache.slot_of[(0, 1)]) == "full"


def test_arena_slots_sit_above_the_kv_blocks_and_move_with_the_limit() -> None:
    from strata.config import ModelConfig
    from tests.test_moe_models import MOE_CONFIGS

    mc = ModelConfig.from_hf(MOE_CONFIGS["mixtral"]())
    store = HostExpertStore(weights())
    arena = ExpertArena(mc, 10, 4, store.expert_numel, torch.float32, torch.device("cpu"))
    block = arena.block_numel  # 2 layers x K/V x 4 tokens x 2 heads x 16 dims
    assert block == 512 and arena.expert_numel == 144
    assert arena.slots_above(9) == 3 and arena.limit_for_slots(4) == 8
    # Slot 0 is the top of the arena; KV block 9 of layer 1 is inside the same memory.
    arena.slot(0).fill_(7.0)
    assert arena.kv_cache.v[1, 9, 3].eq(7.0).all()
    assert arena.kv_cache.k[0, 0].data_ptr() == arena.flat.data_ptr()
    kv = KVManager(10, 4, b"root")
    cache = ExpertCache(store, arena.slot, 0, make_policy("lru", 2), torch.device("cpu"))
    experts = OffloadedExperts(cache, {}, OffloadOptions(cpu_compute="off"))
    offload = ExpertOffload(arena, cache, experts, initial_slots=4, max_slots=8, min_kv_blocks=2)
    offload.attach(kv)
    assert offload.limit == 8 and kv.pool.withdrawn == {8, 9} and cache.capacity == 4
    offload.set_expert_slots(1)
    assert kv.pool.withdrawn == {9} and kv.pool.free_order()[0] == 8
    assert arena.flat[8 * block : 9 * block].eq(0).all()  # zeroed before KV takes it back
    kv.check_integrity()
    offload.check_integrity()


def test_metrics_expose_moe_counters() -> None:
    stats = {
        "num_running": 0, "num_waiting": 0, "kv_blocks_free": 3, "kv_blocks_total": 4,
        "prefix_cache_queried_tokens": 0, "prefix_cache_hit_tokens": 0, "num_preemptions": 0,
        "num_prompt_tokens": 0, "num_generated_tokens": 0, "prefix_cache_tier_hit_tokens": 0,
        "num_swaps": 0, "moe_expert_uses": 10,
        "moe_expert_misses": 2, "moe_experts_cpu_computed": 1, "moe_expert_hit_rate": 0.7,
        "moe_expert_low_precision_loads": 0, "moe_bytes_moved": 123, "moe_prefetch_loads": 4,
        "moe_rebalances": 1, "moe_prefetch_precision": 0.5, "moe_prefetch_recall": 0.25,
        "moe_expert_slots": 6, "moe_expert_slots_used": 5, "moe_budget_kv_bytes": 100,
        "moe_budget_expert_bytes": 200, "moe_expert_hit_rate_per_layer": {0: 0.5, 1: 0.9},
    }  # fmt: skip
    text = ServerMetrics(lambda: stats).render().decode()
    assert "strata_moe_expert_hit_rate 0.7" in text
    assert 'strata_moe_expert_hit_rate_layer{layer="1"} 0.9' in text
    assert "strata_moe_bytes_moved_total 123.0" in text
    assert "strata_moe_budget_expert_bytes 200.0" in text
