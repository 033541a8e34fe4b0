"""The HTTP API with KV tiers: session pins from the request body, tier metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.server_utils import engine_factory, start_server


def test_session_fields_and_tier_metrics(tiny_models: dict[str, Any]) -> None:
    folder: Path = tiny_models["llama-gqa"][0]
    running = start_server(
        engine_factory(str(folder), num_kv_blocks=32, block_size=4, max_model_len=48,
                       kv_cpu_memory=0.01),
        model_name="tiny",
    )  # fmt: skip
    try:
        prompt = list(range(10, 39))  # 29 tokens
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}  # fmt: skip
        first = httpx.post(f"{running.url}/v1/completions",
                           json={**body, "session_id": "chat-1", "cache_ttl_s": 30}, timeout=60)
        assert first.status_code == 200, first.text
        running.wait_idle()
        assert running.engine.sessions.where("chat-1") == "gpu"

        running.engine.sessions.release("chat-1")
        running.engine.kv.evict_all_cached()
        again = httpx.post(f"{running.url}/v1/completions", json=body, timeout=60)
        assert again.status_code == 200
        assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 28
        assert again.json()["choices"][0]["token_ids"] == first.json()["choices"][0]["token_ids"]

        metrics = httpx.get(f"{running.url}/metrics", timeout=10).text
        assert 'strata_kv_tier_hits_total{tier="cpu"} 7.0' in metrics
        assert "strata_prefix_cache_tier_hits_total 28.0" in metrics
        assert 'strata_kv_tier_capacity_bytes{tier="cpu"}' in metrics

        bad = httpx.post(f"{running.url}/v1/completions", json={**body, "cache_ttl_s": 5},
                         timeout=10)  # fmt: skip
        assert bad.status_code == 400
        assert "cache_ttl_s needs a session_id" in bad.json()["error"]["message"]
        running.assert_no_leaks()
    finally:
        running.stop()
