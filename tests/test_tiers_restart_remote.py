"""Disk and remote tiers inside the engine, across real processes and a real Valkey/Redis:
reuse after a restart, between two processes, damaged blocks, and a server that dies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from strata import LLM
from tests.conftest import assert_no_leaks
from tests.redis_server import RedisServer, server_binary
from tests.test_tiers_engine import KW, _prompts, _tokens

REPO = Path(__file__).resolve().parents[1]
PROMPTS = _prompts(4, 41, seed=21)
# One engine in a child process: runs PROMPTS, prints the tokens and tier stats, closes.
CHILD = """
import json, sys
from strata import LLM, SamplingParams
folder, tiers = sys.argv[1], json.loads(sys.argv[2])
prompts = json.loads(sys.argv[3])
llm = LLM(folder, device="cpu", block_size=4, max_model_len=48, num_kv_blocks=16, **tiers)
greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
out = [o.token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
llm.engine.tiers.flush()  # the write-through of the last blocks runs on its own threads
stored = llm.stats()["kv_tier_blocks_stored"]
llm.close()
print(json.dumps({"tokens": out, "stored": stored}))
"""

needs_server = pytest.mark.skipif(server_binary() is None, reason="no valkey/redis-server")


@pytest.fixture(scope="module")
def folder(tiny_models: dict[str, Any]) -> Path:
    return tiny_models["llama-gqa"][0]


@pytest.fixture(scope="module")
def expected(folder: Path) -> list[list[int]]:
    return _tokens(LLM(str(folder), num_kv_blocks=64, enable_prefix_caching=False, **KW), PROMPTS)


def _run_child(folder: Path, tiers: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), json.dumps(tiers), json.dumps(PROMPTS)],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_disk_blocks_are_reused_after_a_process_restart(
    folder: Path, expected: list[list[int]], tmp_path: Path
) -> None:
    tiers = {"kv_disk_dir": str(tmp_path / "kv"), "kv_disk_size": 0.01}
    child = _run_child(folder, tiers)
    assert child["tokens"] == expected and child["stored"] == 4 * 11
    llm = LLM(str(folder), num_kv_blocks=16, **tiers, **KW)  # a new process's view: cold cpu
    assert _tokens(llm, PROMPTS) == expected
    stats = llm.stats()
    assert stats["kv_tier_disk_hits"] == 4 * 10  # every full prompt block, from disk
    assert stats["prefix_cache_tier_hit_tokens"] == 4 * 40
    assert_no_leaks(llm)
    llm.close()


def test_damaged_and_foreign_blocks_are_recomputed(
    folder: Path, expected: list[list[int]], tmp_path: Path, tiny_models: dict[str, Any]
) -> None:
    disk = tmp_path / "kv"
    tiers = {"kv_disk_dir": str(disk), "kv_disk_size": 0.01}
    _run_child(folder, tiers)
    files = sorted(p for p in disk.rglob("*") if p.is_file())
    assert len(files) == 4 * 11
    # Flip a payload byte in one block and truncate another.
    flipped = bytearray(files[0].read_bytes())
    flipped[-1] ^= 0xFF
    files[0].write_bytes(bytes(flipped))
    files[1].write_bytes(files[1].read_bytes()[:-7])
    llm = LLM(str(folder), num_kv_blocks=16, **tiers, **KW)
    assert _tokens(llm, PROMPTS) == expected
    stats = llm.stats()
    assert stats["kv_tier_disk_corrupt"] == 2
    assert stats["kv_tier_disk_hits"] < 4 * 10
    assert_no_leaks(llm)
    llm.close()
    # Another model (other weights, same shape) shares the directory and reads nothing.
    other = tiny_models["llama-gqa"][0].parent / "other"
    if not other.exists():
        from tests.conftest import TINY_CONFIGS, make_hf_model

        make_hf_model(TINY_CONFIGS["llama-gqa"](), seed=1).save_pretrained(other)
    llm = LLM(str(other), num_kv_blocks=16, **tiers, **KW)
    _tokens(llm, PROMPTS)
    assert llm.stats()["kv_tier_disk_hits"] == 0
    llm.close()


@needs_server
def test_two_processes_share_blocks_through_valkey(
    folder: Path, expected: list[list[int]], tmp_path: Path
) -> None:
    with RedisServer(tmp_path) as server:
        child = _run_child(folder, {"kv_remote": server.url})
        assert child["tokens"] == expected
        llm = LLM(str(folder), num_kv_blocks=16, kv_remote=server.url, **KW)
        assert _tokens(llm, PROMPTS) == expected
        stats = llm.stats()
        assert stats["kv_tier_remote_hits"] == 4 * 10
        assert stats["prefix_cache_tier_hit_tokens"] == 4 * 40
        assert_no_leaks(llm)
        llm.close()


@needs_server
def test_valkey_stopped_mid_run_then_back(
    folder: Path, expected: list[list[int]], tmp_path: Path
) -> None:
    with RedisServer(tmp_path) as server:
        # a stopped server refuses at once; the timeout only bounds a slow answer, and a
        # loaded machine must not turn one into a down tier
        llm = LLM(str(folder), num_kv_blocks=16, kv_remote=server.url, kv_remote_timeout_s=2.0,
                  kv_cpu_memory=20 * 1024 / 2**30, **KW)  # fmt: skip
        assert _tokens(llm, PROMPTS) == expected
        llm.engine.tiers.flush()
        server.stop()
        # The CPU tier holds only 20 blocks, so some reuse needs the dead remote: every
        # request still completes with the same tokens, by recomputing.
        llm.engine.kv.evict_all_cached()
        assert _tokens(llm, PROMPTS) == expected
        assert llm.stats()["kv_tier_remote_errors"] > 0
        server.start()  # empty: --save ''
        time.sleep(2.5)  # the tier retries a dead server every 2 s
        llm.engine.kv.evict_all_cached()
        _tokens(llm, PROMPTS)  # recomputed blocks are written through to the live server
        llm.engine.tiers.flush()
        llm.engine.kv.evict_all_cached()
        hits_before = llm.stats()["kv_tier_remote_hits"]
        assert _tokens(llm, _prompts(4, 41, seed=21)) == expected
        assert llm.stats()["kv_tier_remote_hits"] > hits_before
        assert_no_leaks(llm)
        llm.close()


def test_unwritable_disk_dir_still_serves(folder: Path, expected: list[list[int]]) -> None:
    llm = LLM(str(folder), num_kv_blocks=16, kv_disk_dir="/proc/strata-kv", **KW)
    assert _tokens(llm, PROMPTS) == expected
    llm.close()
