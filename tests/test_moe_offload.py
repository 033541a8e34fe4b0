"""Expert offloading on tiny MoE models (CPU): greedy tokens identical to resident experts
at every cache size, with and without prefetch and CPU compute; the KV/expert boundary
moved mid-run loses no request and leaks no block or slot; the rebalancer's decisions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from strata import LLM, SamplingParams
from strata.config import MoEConfig
from strata.errors import KVCacheTooSmallError
from tests.conftest import assert_no_leaks, make_hf_model
from tests.test_moe_models import MOE_CONFIGS

PROMPTS = [[5, 17, 300, 42, 7, 99, 250, 3, 11], [400, 8], list(range(30, 67))]
PARAMS = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def moe_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, make in MOE_CONFIGS.items():
        folder = tmp_path_factory.mktemp(f"offload-{name}")
        make_hf_model(make()).save_pretrained(folder)
        out[name] = folder
    return out


def offload_llm(folder: Path, num_kv_blocks: int = 64, **moe: Any) -> LLM:
    return LLM(str(folder), device="cpu", num_kv_blocks=num_kv_blocks, block_size=4,
               max_model_len=64, moe=MoEConfig(**moe))  # fmt: skip


def resident_tokens(folder: Path) -> list[list[int]]:
    llm = LLM(str(folder), device="cpu", num_kv_blocks=64, block_size=4)
    return [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]


# (slots, prefetch, cpu_compute, policy): 1 slot in all, one layer's worth, all experts
CASES = [
    (1, False, "off", "lfru"),
    (1, True, "on", "lru"),
    (3, True, "off", "lfru"),
    (3, False, "on", "lru"),
    (5, True, "off", "lru"),
    (1000, True, "off", "lfru"),
    (1000, False, "on", "lfru"),
]


@pytest.mark.parametrize("name", list(MOE_CONFIGS))
def test_tokens_identical_at_any_cache_size(name: str, moe_folders: dict[str, Path]) -> None:
    folder = moe_folders[name]
    ref = resident_tokens(folder)
    for slots, prefetch, cpu, policy in CASES:
        llm = offload_llm(
            folder, expert_slots=slots, prefetch=prefetch, cpu_compute=cpu, policy=policy
        )
        out = [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]
        assert out == ref, (slots, prefetch, cpu, policy)
        assert_no_leaks(llm)
        stats = llm.stats()
        assert stats["moe_expert_slots"] == min(slots, stats["moe_expert_slots"])
        assert stats["moe_expert_slots_used"] <= stats["moe_expert_slots"]
        total = stats["moe_expert_hits"] + stats["moe_expert_prefetch_hits"]
        total += stats["moe_expert_misses"] + stats["moe_experts_cpu_computed"]
        assert total == stats["moe_expert_uses"] > 0
        if cpu == "on":
            assert stats["moe_expert_misses"] == 0 and stats["moe_experts_cpu_computed"] > 0
        else:
            assert stats["moe_experts_cpu_computed"] == 0
        if not prefetch:
            assert stats["moe_prefetch_loads"] == 0 and stats["moe_expert_prefetch_hits"] == 0


def test_all_experts_resident_after_warmup_means_only_hits(moe_folders: dict[str, Path]) -> None:
    llm = offload_llm(moe_folders["mixtral"], expert_slots=1000, prefetch=False, cpu_compute="off")
    llm.generate(PROMPTS, PARAMS)
    first = llm.stats()
    assert first["moe_expert_slots"] == 8 and first["moe_expert_misses"] == 8  # 2 layers x 4
    llm.generate(PROMPTS, PARAMS)
    second = llm.stats()
    assert (
        second["moe_expert_misses"] == 8
        and second["moe_expert_hit_rate"] > first["moe_expert_hit_rate"]
    )
    assert second["moe_bytes_moved"] == first["moe_bytes_moved"]


@pytest.mark.parametrize("preempt", [True, False])
def test_rebalance_mid_run_loses_no_request_and_leaks_nothing(
    preempt: bool, moe_folders: dict[str, Path]
) -> None:
    folder = moe_folders["olmoe"]
    ref = resident_tokens(folder)
    # The arena: 120 KV blocks + 1 slot = 168 blocks; 3 slots leave 24 blocks to KV.
    llm = offload_llm(folder, num_kv_blocks=120, expert_slots=1, rebalance_interval=0)
    engine = llm.engine
    assert engine.moe is not None
    ids = [engine.add_request(p, PARAMS) for p in PROMPTS]
    outputs: dict[str, list[int]] = {}
    # Grow the experts into the KV blocks the running requests hold, then shrink back.
    plan = {1: 3, 3: 1, 5: 3, 7: 2}
    step = 0
    while engine.has_unfinished():
        if step in plan:
            engine.set_expert_slots(plan[step], preempt=preempt)
            engine.check_integrity()
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.token_ids
        engine.check_integrity()
        step += 1
    assert [outputs[i] for i in ids] == ref
    assert engine.step() == []  # idle: a move waiting for held blocks completes now
    assert_no_leaks(llm)
    stats = llm.stats()
    assert stats["moe_rebalances"] == len(plan)
    assert stats["moe_expert_slots"] == 2 and engine.moe.max_slots == 3
    arena = engine.moe.arena
    assert stats["kv_blocks_total"] == arena.num_blocks - len(engine.kv.pool.withdrawn)
    assert engine.moe.limit == arena.limit_for_slots(2)
    if preempt:
        assert stats["num_preemptions"] > 0


def test_rebalancer_gives_kv_to_long_contexts_and_slots_to_short_requests(
    moe_folders: dict[str, Path],
) -> None:
    folder = moe_folders["olmoe"]
    # Long prompts: KV demand beyond the pool -> KV grows, experts shrink.
    llm = offload_llm(folder, num_kv_blocks=30, expert_slots=12, rebalance_interval=2)
    long_params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    llm.generate([list(range(i, i + 40)) for i in range(6)], long_params)
    stats = llm.stats()
    assert stats["moe_rebalances"] >= 1
    assert stats["moe_expert_slots"] < 12
    assert_no_leaks(llm)
    # Short requests and a high miss rate: the experts take the spare KV.
    llm = offload_llm(folder, num_kv_blocks=800, expert_slots=1, rebalance_interval=2)
    llm.generate([[3, 4, 5]] * 2, long_params)
    stats = llm.stats()
    assert stats["moe_rebalances"] >= 1 and stats["moe_expert_slots"] == 16  # all experts
    assert_no_leaks(llm)


def test_gpu_memory_budget_splits_the_arena(moe_folders: dict[str, Path]) -> None:
    folder = moe_folders["qwen3_moe"]
    llm = LLM(str(folder), device="cpu", block_size=4, max_model_len=64,
              moe=MoEConfig(gpu_memory=0.05, expert_fraction=0.5))  # fmt: skip
    stats = llm.stats()
    assert stats["moe_expert_slots"] == 8  # one MoE layer of 8 experts fits in half
    assert (
        stats["moe_budget_kv_bytes"] + stats["moe_budget_expert_bytes"]
        <= stats["moe_budget_arena_bytes"]
    )
    assert llm.generate(PROMPTS, PARAMS)[0].token_ids == resident_tokens(folder)[0]
    with pytest.raises(KVCacheTooSmallError, match="raise --gpu-memory"):
        LLM(str(folder), device="cpu", block_size=4, max_model_len=64,
            moe=MoEConfig(gpu_memory=0.0001))  # fmt: skip


def test_offloading_refuses_a_lossy_kv_codec(moe_folders: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype='auto', not 'int4'"):
        LLM(str(moe_folders["qwen3_moe"]), device="cpu", block_size=4, max_model_len=64,
            kv_cache_dtype="int4", moe=MoEConfig(expert_slots=4))  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gpu_memory": 0}, "gpu_memory must be > 0"),
        ({"expert_slots": 0}, "expert_slots must be >= 1"),
        ({"policy": "fifo"}, "policy must be one of lfru, lru"),
        ({"cpu_compute": "maybe"}, "cpu_compute must be one of"),
        ({"miss_precision": "int2"}, "miss_precision must be one of"),
        ({"low_precision_threshold": 2.0}, "gate weight in"),
        ({"expert_fraction": 1.0}, "expert_fraction"),
        ({"rebalance_interval": -1}, "rebalance_interval"),
    ],
)
def test_moe_config_rejects_bad_values(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MoEConfig(**kwargs)
