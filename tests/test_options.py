"""Options: the config fields are the one source of the `LLM(...)` keywords and the flags."""

from __future__ import annotations

import argparse
import typing
from typing import Any

import pytest

from strata import config
from strata.attention.backend import BACKENDS
from strata.cli import build_parser
from strata.config import ENGINE_OPTIONS, EngineConfig, MoEConfig
from strata.engine.llm import LLM
from strata.engine_flags import add_engine_args, engine_keywords
from strata.kv.codec import CODECS
from strata.kv.policies.registry import POLICIES as KV_POLICIES
from strata.kv.pool_order import FREE_BLOCK_ORDERS
from strata.kv.recall.registry import RECALL_POLICIES
from strata.kv.tiers.eviction import EVICTION_ORDERS
from strata.moe.policies import POLICIES as EXPERT_POLICIES
from strata.options import build

# Every keyword LLM took when its arguments were written by hand, with its default.
LLM_KEYWORDS: dict[str, Any] = {
    "model": None, "device": None, "dtype": "auto", "kv_cache_memory": None, "block_size": 16,
    "num_kv_blocks": None, "gpu_memory_utilization": 0.90, "enable_prefix_caching": True,
    "max_num_batched_tokens": 2048, "max_num_seqs": 256, "max_model_len": None, "seed": 0,
    "attention_backend": "auto", "enforce_eager": False, "kv_cpu_memory": None,
    "kv_disk_dir": None, "kv_disk_size": 16.0, "kv_remote": None, "kv_remote_timeout_s": 0.5,
    "kv_tier_eviction": "lru", "preemption_mode": "auto", "session_gpu_fraction": 0.25,
    "kv_policy": "full", "kv_budget": None, "kv_evict_interval": None, "kv_cache_dtype": "auto",
}  # fmt: skip


@pytest.mark.parametrize(
    ("choices", "registry", "extra"),
    [
        (config.AttentionBackendName, BACKENDS, {"auto"}),
        (config.KVCacheDtype, CODECS, set()),
        (config.KVPolicyName, KV_POLICIES, {"full", *RECALL_POLICIES.names()}),
        (config.TierEviction, EVICTION_ORDERS, set()),
        (config.KVEviction, FREE_BLOCK_ORDERS, set()),
        (config.ExpertCachePolicy, EXPERT_POLICIES, set()),
    ],
)
def test_literal_choices_name_the_registry_entries(
    choices: Any, registry: Any, extra: set[str]
) -> None:
    assert set(typing.get_args(choices)) == set(registry.names()) | extra


def test_every_old_keyword_keeps_its_default() -> None:
    defaults = {o.keyword: o.default for o in ENGINE_OPTIONS}
    assert {k: defaults[k] for k in LLM_KEYWORDS} == LLM_KEYWORDS
    assert all(k in (LLM.__doc__ or "") for k in defaults)


def test_keywords_build_the_nested_config() -> None:
    built = build(EngineConfig, {
        "block_size": 32, "kv_remote_timeout_s": 2.0, "expert_cache_policy": "lru",
        "expert_prefetch": False, "max_num_seqs": 3, "enforce_eager": True,
    })  # fmt: skip
    assert built.cache.block_size == 32 and built.cache.tiers.remote_timeout_s == 2.0
    assert built.moe.policy == "lru" and built.moe.prefetch is False
    assert built.scheduler.max_num_seqs == 3 and built.enforce_eager
    assert build(EngineConfig, {}) == EngineConfig()
    assert build(EngineConfig, {"moe": MoEConfig(expert_slots=4)}).moe.expert_slots == 4


def test_unknown_or_conflicting_keywords_are_refused() -> None:
    with pytest.raises(TypeError, match=r"unknown option 'kv_size'; valid: model, device"):
        build(EngineConfig, {"kv_size": 1})
    with pytest.raises(ValueError, match=r"give moe= or its options \(expert_slots\)"):
        build(EngineConfig, {"moe": MoEConfig(), "expert_slots": 2})
    refused = "kv_tier_eviction must be one of lru, fifo, cost; got 'lfu'"
    with pytest.raises(ValueError, match=refused):
        build(EngineConfig, {"kv_tier_eviction": "lfu"})


def _engine_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    return parser


def test_flag_defaults_are_the_config_defaults() -> None:
    keywords = engine_keywords(_engine_parser().parse_args([]))
    assert keywords == {o.keyword: o.default for o in ENGINE_OPTIONS if o.spec.cli}
    assert build(EngineConfig, keywords) == EngineConfig()


def test_flags_parse_to_keywords() -> None:
    args = _engine_parser().parse_args([
        "--no-prefix-caching", "--no-cuda-graphs", "--no-expert-prefetch", "--kv-budget", "0.5",
        "--kv-policy", "snapkv", "--kv-remote-timeout", "3", "--expert-slots", "2",
    ])  # fmt: skip
    keywords = engine_keywords(args)
    assert keywords["enable_prefix_caching"] is False and keywords["enforce_eager"] is True
    assert keywords["expert_prefetch"] is False and keywords["kv_remote_timeout_s"] == 3.0
    built = build(EngineConfig, keywords)
    assert (built.cache.kv_policy, built.cache.kv_budget, built.moe.expert_slots) == (
        "snapkv", 0.5, 2,
    )  # fmt: skip
    with pytest.raises(SystemExit):
        _engine_parser().parse_args(["--kv-policy", "nope"])


def test_every_engine_command_has_every_engine_flag() -> None:
    flags = {o.flag for o in ENGINE_OPTIONS if o.spec.cli}
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("generate", "chat", "serve"):
        command = sub.choices[name]
        assert flags <= {s for a in command._actions for s in a.option_strings}, name


def test_llm_refuses_an_unknown_keyword() -> None:
    with pytest.raises(TypeError, match="unknown option 'devices'"):
        LLM(devices="cpu")
