"""The CPU tier inside the engine: outputs equal recompute, exact tier hits, swap
preemption, session pins with TTL, aborts during a load, and no leaks in any tier."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from strata import LLM, SamplingParams
from tests.conftest import assert_no_leaks

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
KW: dict[str, Any] = {"device": "cpu", "block_size": 4, "max_model_len": 48}


def _prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(length)] for _ in range(n)]


def _tokens(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def folder(tiny_models: dict[str, Any]) -> Path:
    return tiny_models["llama-gqa"][0]


@pytest.fixture(scope="module")
def reference(folder: Path) -> dict[str, list[list[int]]]:
    llm = LLM(str(folder), num_kv_blocks=64, enable_prefix_caching=False, **KW)
    return {"a": _tokens(llm, _prompts(6, 41)), "b": _tokens(llm, _prompts(6, 41, seed=1))}


def test_evicted_prefix_comes_back_from_cpu(folder: Path, reference: dict) -> None:
    # 16 blocks of 4 tokens cannot keep six 41-token prompts: the second pass finds
    # nothing on the GPU and loads every full prompt block (10 per prompt) from the CPU tier.
    llm = LLM(str(folder), num_kv_blocks=16, kv_cpu_memory=0.01, **KW)
    assert _tokens(llm, _prompts(6, 41)) == reference["a"]
    llm.engine.kv.evict_all_cached()
    assert _tokens(llm, _prompts(6, 41)) == reference["a"]
    stats = llm.stats()
    assert stats["prefix_cache_tier_hit_tokens"] == 6 * 40
    assert stats["kv_tier_blocks_loaded"] == 60 and stats["kv_tier_cpu_hits"] == 60
    assert stats["kv_tier_partial_loads"] == 0
    # 10 prompt blocks + 1 block filled by the output, per prompt, written once each
    assert stats["kv_tier_blocks_stored"] == 6 * 11
    assert_no_leaks(llm)
    llm.close()


def test_cpu_tier_smaller_than_the_working_set_still_exact(folder: Path, reference: dict) -> None:
    # 20 blocks of CPU tier: most blocks are evicted from it too; whatever is found is
    # loaded, the rest recomputed, and the tokens never change.
    block_bytes = 2 * 2 * 4 * 2 * 16 * 4  # layers, k|v, tokens, kv heads, head dim, fp32
    llm = LLM(str(folder), num_kv_blocks=16, kv_cpu_memory=20 * block_bytes / 2**30, **KW)
    for _ in range(2):
        assert _tokens(llm, _prompts(6, 41)) == reference["a"]
        assert _tokens(llm, _prompts(6, 41, seed=1)) == reference["b"]
    stats = llm.stats()
    assert stats["kv_tier_cpu_evictions"] > 0
    assert stats["kv_tier_cpu_used_bytes"] <= stats["kv_tier_cpu_capacity_bytes"]
    assert_no_leaks(llm)
    llm.close()


LONG = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("mode", ["swap", "recompute", "no tiers"])
def test_preemption_modes_keep_outputs_exact(folder: Path, mode: str) -> None:
    # Two 37-token prompts take 10 blocks each; growing to 47 tokens needs 12 each, so a
    # 22-block pool preempts during decode. Swap pins the victim's blocks in the CPU tier
    # and reloads them; recompute (with or without tiers) may still find them there.
    prompts = _prompts(4, 37, seed=11)
    expected = _tokens(LLM(str(folder), num_kv_blocks=64, **KW), prompts, LONG)
    tiers: dict[str, Any] = {} if mode == "no tiers" else {"kv_cpu_memory": 0.01}
    mode_kw = {"preemption_mode": mode} if mode != "no tiers" else {}
    llm = LLM(str(folder), num_kv_blocks=22, **tiers, **mode_kw, **KW)
    assert _tokens(llm, prompts, LONG) == expected
    stats = llm.stats()
    assert stats["num_preemptions"] > 0
    assert stats["num_swaps"] == (stats["num_preemptions"] if mode == "swap" else 0)
    if mode == "swap":
        assert stats["prefix_cache_tier_hit_tokens"] > 0
    assert_no_leaks(llm)
    llm.close()


def test_abort_while_loading_frees_blocks_when_the_load_lands(folder: Path) -> None:
    llm = LLM(str(folder), num_kv_blocks=32, kv_cpu_memory=0.01, **KW)
    prompt = _prompts(1, 41)[0]
    _tokens(llm, [prompt])
    llm.engine.kv.evict_all_cached()
    engine = llm.engine
    rid = engine.add_request(prompt, GREEDY)
    engine.step()  # admitted into `loading`; its blocks belong to the load
    assert rid in engine.scheduler.loading
    engine.abort(rid)
    assert not engine.kv.has(rid) or engine.scheduler.has_unfinished()
    while engine.has_unfinished():
        engine.step()
    assert_no_leaks(llm)
    llm.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_session_pin_survives_pressure_until_ttl(folder: Path) -> None:
    # No CPU tier: the pin lives on the GPU, and other traffic must not evict it.
    llm = LLM(str(folder), num_kv_blocks=40, session_gpu_fraction=0.5, **KW)
    clock = FakeClock()
    llm.engine.sessions.clock = clock
    history = _prompts(1, 29, seed=7)[0]
    turn = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, session_id="s1",
                          cache_ttl_s=60)  # fmt: skip
    first = llm.generate([history], turn, use_tqdm=False)[0]
    assert llm.engine.sessions.where("s1") == "gpu"
    pinned = llm.stats()["kv_session_blocks_on_gpu"]
    assert pinned == 8  # 32 computed tokens of 33 -> 8 full blocks
    _tokens(llm, _prompts(8, 41, seed=9))  # pressure: 8 x 12 blocks through a 40-block pool
    second = [*history, *first.token_ids, 5, 6, 7]
    out = llm.generate([second], turn, use_tqdm=False)[0]
    assert out.num_cached_tokens == 32
    clock.now += 61
    llm.engine.step()
    assert llm.engine.sessions.where("s1") is None
    assert llm.stats()["kv_sessions_expired"] == 1
    assert_no_leaks(llm)


def test_session_pin_without_room_on_gpu_goes_to_cpu(folder: Path) -> None:
    llm = LLM(str(folder), num_kv_blocks=40, session_gpu_fraction=0.0, kv_cpu_memory=0.01, **KW)
    clock = FakeClock()
    llm.engine.sessions.clock = clock
    turn = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, session_id="s2")
    history = _prompts(1, 29, seed=3)[0]
    first = llm.generate([history], turn, use_tqdm=False)[0]
    assert llm.engine.sessions.where("s2") == "cpu"
    llm.engine.tiers.flush()
    assert llm.engine.tiers.cpu.num_pinned == 8
    llm.engine.kv.evict_all_cached()
    out = llm.generate([[*history, *first.token_ids, 9]], turn, use_tqdm=False)[0]
    assert out.num_cached_tokens == 32  # all from the CPU tier
    clock.now += SamplingParams.DEFAULT_SESSION_TTL_S + 1
    llm.engine.step()
    llm.engine.tiers.flush()
    assert llm.engine.tiers.cpu.num_pinned == 0
    assert_no_leaks(llm)
    llm.close()


def test_gpu_session_pins_are_demoted_when_the_pool_runs_out(folder: Path) -> None:
    llm = LLM(str(folder), num_kv_blocks=24, session_gpu_fraction=1.0, kv_cpu_memory=0.01, **KW)
    for i, prompt in enumerate(_prompts(2, 41, seed=5)):
        turn = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, session_id=f"u{i}")
        llm.generate([prompt], turn, use_tqdm=False)
    assert llm.stats()["kv_sessions_pinned_gpu"] == 2  # 22 of 24 blocks pinned
    _tokens(llm, _prompts(1, 41, seed=6))  # needs 12 blocks: one pin must move to the CPU
    stats = llm.stats()
    assert stats["kv_sessions_demoted"] >= 1 and stats["kv_sessions_pinned_cpu"] >= 1
    for i in range(2):
        llm.engine.sessions.release(f"u{i}")
    assert_no_leaks(llm)
    llm.close()


def test_session_params_are_validated() -> None:
    with pytest.raises(ValueError, match="session_id"):
        SamplingParams(session_id="")
    with pytest.raises(ValueError, match="cache_ttl_s needs a session_id"):
        SamplingParams(cache_ttl_s=5)
    with pytest.raises(ValueError, match="cache_ttl_s must be in"):
        SamplingParams(session_id="x", cache_ttl_s=float("nan"))
    assert SamplingParams(session_id="x").cache_ttl_s == SamplingParams.DEFAULT_SESSION_TTL_S


def test_tier_config_errors_are_clear() -> None:
    from strata.config import CacheConfig, TierConfig

    with pytest.raises(ValueError, match="valkey://host:port"):
        TierConfig(remote="http://x")
    with pytest.raises(ValueError, match="preemption_mode must be one of"):
        TierConfig(preemption_mode="never")
    with pytest.raises(ValueError, match="need prefix caching"):
        CacheConfig(enable_prefix_caching=False, tiers=TierConfig(cpu_memory=1))
