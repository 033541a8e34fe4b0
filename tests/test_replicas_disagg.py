"""`strata serve --prefill-replicas 1 --decode-replicas 1 --kv-remote URL`: a tiny model
on one local Ray cluster and a real Valkey/Redis server, both started once for the module.
The decode replica must load the prompt's blocks from the shared tier (its counters say
so) and generate the same greedy tokens as one co-located engine."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from strata.cli import main
from strata.engine.llm import LLM
from strata.engine.sampling_params import SamplingParams
from strata.server.replicas.prompt_keys import PromptKeys
from tests.redis_server import RedisServer, running_server
from tests.replicas_utils import RunningReplicas, start_replicas

pytest.importorskip("ray.serve")

BLOCK = 16  # the engine's default block size
PROMPTS = [random.Random(seed).choices(range(100, 4000), k=n) for seed, n in ((1, 70), (2, 41))]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    yield from running_server(tmp_path_factory)


def engine_kwargs(folder: Path) -> dict[str, Any]:
    return {"model": str(folder), "device": "cpu", "num_kv_blocks": 64}


@pytest.fixture(scope="module")
def disagg(tiny_chat_folder: Path, server: RedisServer) -> Iterator[RunningReplicas]:
    engine = {**engine_kwargs(tiny_chat_folder), "kv_remote": server.url}
    running = start_replicas(engine, prefill_replicas=1, decode_replicas=1, replica_cpus=0.5)
    yield running
    running.close()


@pytest.fixture(scope="module")
def colocated(tiny_chat_folder: Path) -> list[list[int]]:
    """Greedy tokens of each prompt from one engine that computes it all (no tiers)."""
    llm = LLM(**engine_kwargs(tiny_chat_folder))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return [out.token_ids for out in llm.generate(PROMPTS, params)]


def complete(r: RunningReplicas, prompt: list[int]) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}  # fmt: skip
    response = httpx.post(f"{r.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["x-strata-replica"] == "replica-0"
    return dict(response.json())


def outcomes(r: RunningReplicas) -> dict[str, float]:
    text = httpx.get(f"{r.url}/metrics").text
    found = {}
    for line in text.splitlines():
        if line.startswith("strata_prefill_requests_total{"):
            found[line.split('"')[1]] = float(line.rsplit(" ", 1)[1])
    return found


def test_decode_loads_the_prefilled_blocks_and_equals_colocated(
    disagg: RunningReplicas, colocated: list[list[int]]
) -> None:
    for prompt, expected in zip(PROMPTS, colocated, strict=True):
        before = disagg.stats(0)
        out = complete(disagg, prompt)
        assert out["choices"][0]["token_ids"] == expected
        blocks = (len(prompt) - 1) // BLOCK  # every block but the one holding the last token
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == blocks * BLOCK
        after = disagg.stats(0)  # the decode replica found them in the shared tier
        assert after["kv_tier_blocks_loaded"] - before["kv_tier_blocks_loaded"] == blocks
        assert after["kv_tier_remote_hits"] - before["kv_tier_remote_hits"] == blocks
    assert outcomes(disagg) == {"done": 2.0}
    assert disagg.stats(0, "prefill")["kv_tier_remote_bytes_written"] > 0


def test_metrics_hold_both_pools_replicas(disagg: RunningReplicas) -> None:
    text = httpx.get(f"{disagg.url}/metrics").text
    for name in ("prefill-0", "replica-0"):
        assert f'strata_replica_up{{replica="{name}"}} 1.0' in text
        assert f'strata_prompt_tokens_total{{replica="{name}"}}' in text  # its engine's
    assert text.count("# TYPE strata_prompt_tokens_total counter") == 1


def test_a_prefix_the_decode_replica_holds_skips_the_prefill(
    disagg: RunningReplicas, colocated: list[list[int]]
) -> None:
    deadline = time.monotonic() + 10  # the front polls the replica's index events
    keys = disagg.blocks(0)
    while disagg.front.index.keys_of(0) != keys and time.monotonic() < deadline:
        time.sleep(0.05)
    loaded = disagg.stats(0)["kv_tier_blocks_loaded"]
    assert complete(disagg, PROMPTS[0])["choices"][0]["token_ids"] == colocated[0]
    assert outcomes(disagg)["held"] == 1.0
    assert disagg.stats(0)["kv_tier_blocks_loaded"] == loaded
    short = complete(disagg, PROMPTS[1][:BLOCK])  # no full block before its last token
    assert short["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert outcomes(disagg)["short"] == 1.0
    for handle in (*disagg.replicas.handles, *disagg.replicas.prefill_handles):
        handle.check_integrity.remote().result()


def test_written_is_set_once_the_blocks_are_in_the_remote_tier(
    tiny_chat_folder: Path, server: RedisServer
) -> None:
    """The fence a prefill replica waits on before it answers (TierManager.written)."""
    llm = LLM(**engine_kwargs(tiny_chat_folder), kv_remote=server.url)
    prompt = random.Random(7).choices(range(100, 4000), k=70)
    llm.generate([prompt], SamplingParams(max_tokens=1))
    tiers = llm.engine.tiers
    assert tiers is not None and tiers.remote is not None
    assert tiers.written().wait(30)
    keys = PromptKeys(None, "m", llm.engine.kv.root, llm.engine.kv.block_size).chain(prompt, None)
    assert len(keys) == 4 and tiers.remote.contains(keys) == [True] * 4
    llm.close()


@pytest.mark.parametrize(("argv", "message"), [
    (["--prefill-replicas", "1"], "--prefill-replicas needs --decode-replicas"),
    (["--decode-replicas", "2"], "--decode-replicas needs --prefill-replicas"),
    (["--prefill-replicas", "0", "--decode-replicas", "1"], "--prefill-replicas must be >= 1"),
    (["--prefill-replicas", "1", "--decode-replicas", "0"], "--decode-replicas must be >= 1"),
    (["--replicas", "2", "--prefill-replicas", "1", "--decode-replicas", "1"],
     "--replicas is for co-located serving"),
    (["--prefill-replicas", "1", "--decode-replicas", "1"],
     "--prefill-replicas needs --kv-remote URL"),
])  # fmt: skip
def test_bad_disaggregation_options_fail_clearly(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err
