"""KV tiers under tensor parallelism (gloo, 2 ranks): each rank stores its own KV heads
in its own tier entries; TP=2 gives TP=1's greedy tokens and tier hits through CPU-tier
round trips, swap preemption and disk restarts; a block one rank lacks or holds corrupt
is a miss on every rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from strata import LLM
from strata.kv.prefix import chain_key
from strata.kv.tiers.tier_ops import rank_key
from tests.conftest import assert_no_leaks, make_hf_model
from tests.redis_server import RedisServer, server_binary
from tests.test_tensor_parallel import ENGINE, GREEDY, PROMPTS, TP_CONFIGS

LONG = list(range(200, 221))  # five full blocks of 4, then one token
EVICTING = [list(range(300 + 40 * i, 330 + 40 * i)) for i in range(2)]
KEYS = ("prefix_cache_tier_hit_tokens", "prefix_cache_hit_tokens", "num_swaps",
        "num_preemptions")  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("llama-gqa")
    make_hf_model(TP_CONFIGS["llama-gqa"]()).save_pretrained(out)
    return out


def _round_trip(llm: LLM) -> tuple[list[list[int]], dict[str, Any]]:
    """LONG, then prompts that evict its blocks from the pool, then LONG again (a tier
    hit), then a batch that preempts."""
    tokens = [o.token_ids for o in llm.generate([LONG], GREEDY)]
    tokens += [o.token_ids for o in llm.generate(EVICTING, GREEDY)]
    tokens += [o.token_ids for o in llm.generate([LONG], GREEDY)]
    tokens += [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert_no_leaks(llm)
    return tokens, llm.stats()


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_cpu_tier_round_trip_and_swap_equal_tp1(folder: Path, mode: str) -> None:
    options = {**ENGINE, "kv_cpu_memory": 0.01, "preemption_mode": mode}
    want_tokens, want = _round_trip(LLM(str(folder), **options))
    with LLM(str(folder), **options, tensor_parallel_size=2) as tp:
        tokens, stats = _round_trip(tp)
    assert tokens == want_tokens
    for key in KEYS:
        assert stats[key] == want[key], key
    assert stats["prefix_cache_tier_hit_tokens"] >= 5 * 4
    assert stats["num_preemptions"] > 0
    assert stats["num_swaps"] == (stats["num_preemptions"] if mode == "swap" else 0)
    assert stats["kv_tier_rank_short_loads"] == 0


def _disk_run(folder: Path, disk: Path, size: int) -> tuple[list[int], dict[str, Any], bytes]:
    """LONG on a fresh engine over the disk tier `disk`; its tokens, stats and root key."""
    return _run(folder, {"kv_disk_dir": str(disk)}, size)


def _run(folder: Path, tiers: dict[str, Any], size: int) -> tuple[list[int], dict[str, Any], bytes]:
    options = {**ENGINE, "kv_cpu_memory": 0.01, **tiers}
    with LLM(str(folder), **options, tensor_parallel_size=size) as llm:
        tokens = llm.generate([LONG], GREEDY)[0].token_ids
        assert_no_leaks(llm)
        return tokens, llm.stats(), llm.engine.kv.root


def _rank1_file(disk: Path, root: bytes, block: int) -> Path:
    """Rank 1's disk file of LONG's block `block`, from rank 0's key chain."""
    parent = root
    for i in range(block + 1):
        parent = chain_key(parent, LONG[4 * i : 4 * i + 4])
    (path,) = disk.rglob(rank_key(parent, 1).hex())
    return path


def test_disk_restart_and_a_block_one_rank_lacks(folder: Path, tmp_path: Path) -> None:
    want, _, _ = _disk_run(folder, tmp_path / "tp1", 1)
    disk = tmp_path / "tp2"
    first, stats, root = _disk_run(folder, disk, 2)  # computes and writes every block
    assert first == want and stats["prefix_cache_tier_hit_tokens"] == 0
    again, stats, _ = _disk_run(folder, disk, 2)  # every rank finds all five on disk
    assert again == want and stats["prefix_cache_tier_hit_tokens"] == 5 * 4
    # Rank 1's third block corrupt (a checksum miss), its fifth gone: every rank loads
    # the first two and recomputes the rest.
    path = _rank1_file(disk, root, 2)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    _rank1_file(disk, root, 4).unlink()
    third, stats, _ = _disk_run(folder, disk, 2)
    assert third == want
    assert stats["prefix_cache_tier_hit_tokens"] == 2 * 4
    assert stats["kv_tier_rank_short_loads"] == 1


@pytest.mark.skipif(server_binary() is None, reason="no valkey/redis-server")
def test_remote_tier_shared_by_the_ranks(folder: Path, tmp_path: Path) -> None:
    """Each rank writes its own keys to one server; a fresh TP=2 engine finds all five
    blocks there (rank 0 probes, every rank loads its own)."""
    want, _, _ = _run(folder, {}, 1)
    with RedisServer(tmp_path) as server:
        first, stats, _ = _run(folder, {"kv_remote": server.url}, 2)
        assert first == want and stats["prefix_cache_tier_hit_tokens"] == 0
        again, stats, _ = _run(folder, {"kv_remote": server.url}, 2)
        assert again == want and stats["prefix_cache_tier_hit_tokens"] == 5 * 4
        assert stats["kv_tier_rank_short_loads"] == 0
