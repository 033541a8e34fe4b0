"""Hostile and careless requests, over real HTTP: every bad value is a 400 naming its
field, the API key guards every route but /health before the body is read, and bodies
over --max-request-bytes are refused before they are read in full."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch

from strata.cli import SERVE_OPTIONS, build_parser
from strata.flags import keywords_from_args
from strata.options import build
from strata.server.config import ServeConfig
from strata.server.guard import tenant_of
from tests.server_utils import RunningServer, engine_factory, start_server

MODEL = "tiny"
LLM_KWARGS = {"kv_cache_memory": 0.05, "max_model_len": 1024}


@pytest.fixture(scope="module")
def server(tiny_chat_folder: Path) -> Iterator[RunningServer]:
    running = start_server(engine_factory(str(tiny_chat_folder), **LLM_KWARGS), model_name=MODEL)
    yield running
    running.stop()


def post(server: RunningServer, path: str, body: object, **kw: object) -> httpx.Response:
    kw.setdefault("timeout", 30)
    return httpx.post(f"{server.url}{path}", json=body, **kw)  # type: ignore[arg-type]


def error_of(r: httpx.Response, status: int, param: str | None = None) -> str:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    return str(error["message"])


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"top_k": 2**63}, "top_k", "top_k must be -1 (disabled) or an integer in [0, 2147483647]"),
        ({"seed": 2**32}, "seed", "seed must be an integer in [0, 4294967295], got 4294967296"),
        ({"seed": -1}, "seed", "seed must be an integer in [0, 4294967295], got -1"),
        ({"prompt": [True, False]}, "prompt", "prompt"),
        ({"prompt": [[1, 2], [True]]}, "prompt", "prompt"),
        ({"stop_token_ids": [True]}, "stop_token_ids", "stop_token_ids"),
        ({"stop_token_ids": [49152]}, "stop_token_ids", "stop_token_ids must be in [0, 49152)"),
        ({"stop": [f"s{i}" for i in range(65)]}, "stop", "at most 64 stop strings, got 65"),
        ({"stop": "x" * 1025}, "stop", "at most 1024 characters"),
        ({"prompt": ["a"] * 17, "n": 16}, "prompt", "prompts x n must be at most 256, got 17 x 16"),
        ({"kv_policy": "nope"}, "kv_policy", "unknown kv_policy 'nope'"),
        ({"n": True}, "n", "n: Input should be a valid integer"),
        ({"logprobs": True}, "logprobs", "logprobs: Input should be a valid integer"),
        ({"seed": True}, "seed", "seed: Input should be a valid integer"),
        ({"max_tokens": 2.0}, "max_tokens", "max_tokens: Input should be a valid integer"),
        ({"kv_compress_prefix": True}, "kv_compress_prefix", "kv_compress_prefix"),
        ({"kv_policy": "snapkv", "kv_budget": -1}, "kv_budget", "kv_budget"),
    ],
)
def test_bad_values_are_400_naming_the_field(
    server: RunningServer, body: dict[str, object], param: str, message: str
) -> None:
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "x", **body})
    assert message in error_of(r, 400, param)
    server.assert_no_leaks()


def test_a_lone_surrogate_is_400(server: RunningServer) -> None:
    for body, param in (
        (b'{"prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
        (b'{"prompt": "x", "stop": ["\\udfff"], "max_tokens": 1}', "stop"),
        (b'{"prompt": "x", "stop": "\\udfff", "max_tokens": 1}', "stop"),
    ):
        r = httpx.post(
            f"{server.url}/v1/completions", content=body,
            headers={"content-type": "application/json"},
        )  # fmt: skip
        error_of(r, 400, param)
    chat = b'{"messages": [{"role": "user", "content": "\\ud83d"}], "max_tokens": 1}'
    r = httpx.post(
        f"{server.url}/v1/chat/completions", content=chat,
        headers={"content-type": "application/json"},
    )  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_snapkv_on_a_tiny_prompt_succeeds(server: RunningServer) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 3, "kv_policy": "snapkv",
            "kv_budget": 4, "ignore_eos": True}  # fmt: skip
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    server.assert_no_leaks()


def test_a_text_that_cannot_fit_is_refused_without_tokenizing(server: RunningServer) -> None:
    limit = server.engine.requests.max_prompt_chars
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "a" * (limit + 1)})
    message = error_of(r, 400, "prompt")
    assert message.startswith(f"the prompt has {limit + 1} characters; no text over {limit}")
    assert r.json()["error"]["code"] == "context_length_exceeded"


@pytest.fixture(scope="module")
def guarded(tiny_chat_folder: Path) -> Iterator[RunningServer]:
    running = start_server(
        engine_factory(str(tiny_chat_folder), **LLM_KWARGS), model_name=MODEL,
        api_keys=("key-a", "key-b"), max_request_bytes=4096,
    )  # fmt: skip
    yield running
    running.stop()


@pytest.mark.parametrize("path", ["/metrics", "/docs", "/redoc", "/openapi.json", "/v1/models"])
def test_every_route_but_health_needs_the_key(guarded: RunningServer, path: str) -> None:
    assert error_of(httpx.get(f"{guarded.url}{path}"), 401).startswith("missing or incorrect")
    ok = httpx.get(f"{guarded.url}{path}", headers={"Authorization": "Bearer key-b"})
    assert ok.status_code == 200
    assert httpx.get(f"{guarded.url}/health").status_code == 200


def test_the_key_is_checked_before_the_body_is_read(guarded: RunningServer) -> None:
    # A body far over the limit, without the key: 401, not 413 (nothing read).
    big = {"model": MODEL, "prompt": "x" * 100_000}
    error_of(post(guarded, "/v1/completions", big), 401)
    client = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="key-a", max_retries=0)
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=1).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="key-c", max_retries=0).models.list()


def test_a_body_over_the_limit_is_413(guarded: RunningServer) -> None:
    auth = {"Authorization": "Bearer key-a"}
    big = {"model": MODEL, "prompt": "x" * 5000}
    r = post(guarded, "/v1/completions", big, headers=auth)
    message = error_of(r, 413)
    assert message == "the request body is larger than 4096 bytes (--max-request-bytes)"
    assert r.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    r = httpx.post(
        f"{guarded.url}/v1/completions", content=chunks(),
        headers={**auth, "content-type": "application/json"},
    )  # fmt: skip
    assert error_of(r, 413).startswith("the request body is larger than 4096 bytes")
    guarded.assert_no_leaks()


def test_public_metrics(tiny_chat_folder: Path) -> None:
    running = start_server(
        engine_factory(str(tiny_chat_folder), **LLM_KWARGS), model_name=MODEL,
        api_key="k", public_metrics=True,
    )  # fmt: skip
    try:
        assert httpx.get(f"{running.url}/metrics").status_code == 200
        error_of(httpx.get(f"{running.url}/v1/models"), 401)
        error_of(httpx.get(f"{running.url}/openapi.json"), 401)
    finally:
        running.stop()


def _cached(server: RunningServer, key: str, prompt: list[int], **extra: object) -> int:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, **extra}
    r = post(server, "/v1/completions", body, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


def test_tenants_and_cache_salt_do_not_share_cached_prefixes(guarded: RunningServer) -> None:
    prompt = [(11 * i) % 40000 + 100 for i in range(64)]
    assert _cached(guarded, "key-a", prompt) == 0
    assert _cached(guarded, "key-a", prompt) == 48  # its own prefix: whole blocks of 16
    assert _cached(guarded, "key-b", prompt) == 0  # another tenant sees nothing cached
    assert _cached(guarded, "key-a", prompt, cache_salt="s1") == 0
    assert _cached(guarded, "key-a", prompt, cache_salt="s1") == 48
    error_of(post(guarded, "/v1/completions", {"prompt": "x", "cache_salt": ""},
                  headers={"Authorization": "Bearer key-a"}), 400, "cache_salt")  # fmt: skip
    _cached(guarded, "key-b", prompt, session_id="chat", cache_ttl_s=30)
    pinned = f"tenant:{tenant_of('key-b')}/chat"  # tenants never share a session either
    assert guarded.engine.sessions.where(pinned) == "gpu"
    assert guarded.engine.sessions.where("chat") is None
    guarded.engine.sessions.release(pinned)
    guarded.assert_no_leaks()


def test_a_disconnect_aborts_every_sequence_and_logs_one_info_line(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    body = {"model": MODEL, "prompt": ["a", "b", "c", "d"], "n": 16, "max_tokens": 900,
            "ignore_eos": True}  # fmt: skip
    before = server.engine.stats()["num_generated_tokens"]  # 64 sequences, most queued
    with caplog.at_level(logging.INFO, logger="strata"):
        with pytest.raises(httpx.ReadTimeout):
            post(server, "/v1/completions", body, timeout=1.0)
        server.wait_idle(timeout=10)
    assert server.engine.stats()["num_generated_tokens"] - before < 64 * 900
    server.assert_no_leaks()
    records = [r for r in caplog.records if r.name.startswith("strata")]
    assert [r.levelname for r in records if r.levelno >= logging.WARNING] == []
    gone = [r for r in records if "client disconnected" in r.getMessage()]
    assert len(gone) == 1 and gone[0].levelname == "INFO"
    assert "64 choices" in gone[0].getMessage()


@pytest.mark.breaks_engine
def test_an_engine_fault_stops_the_engine_loudly(tiny_chat_folder: Path) -> None:
    running = start_server(engine_factory(str(tiny_chat_folder), **LLM_KWARGS), model_name=MODEL)
    try:

        def out_of_memory(plan: object) -> None:
            raise torch.OutOfMemoryError("injected: CUDA out of memory")

        running.engine.runner.execute = out_of_memory  # type: ignore[method-assign,assignment]
        r = post(running, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert "OutOfMemoryError: injected" in error_of(r, 500)
        assert running.state.engine is not None
        assert not running.state.engine.alive  # the fault was answered: the engine is down
        health = httpx.get(f"{running.url}/health")
        assert health.status_code == 503
        assert health.json() == {"status": "engine stopped after a fault"}
        again = post(running, "/v1/completions", {"model": MODEL, "prompt": "x"})
        assert error_of(again, 503) == "the engine stopped after a fault; see the server log"
    finally:
        running.stop()


def test_api_keys_from_repeated_flags_and_a_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# tenants\nkey-c\n\nkey-a\n")
    args = build_parser().parse_args(
        ["serve", "--api-key", "key-a", "--api-key", "key-b", "--api-key-file", str(keys)]
    )
    config = build(ServeConfig, keywords_from_args(args, SERVE_OPTIONS))
    assert config.api_keys == ["key-a", "key-b", "key-c"]
    keys.write_text("# none\n")
    with pytest.raises(ValueError, match="holds no key"):
        _ = build(ServeConfig, {"api_key_file": str(keys)}).api_keys


def test_latency_metrics_include_the_wait_for_tokenization(tiny_chat_folder: Path) -> None:
    running = start_server(engine_factory(str(tiny_chat_folder), **LLM_KWARGS), model_name=MODEL)
    engine = running.engine
    prepare = engine.prepare

    def slow_prepare(*args: object, **kwargs: object) -> object:
        time.sleep(0.5)  # runs on the tokenizer thread, after the request arrived
        return prepare(*args, **kwargs)  # type: ignore[arg-type]

    engine.prepare = slow_prepare  # type: ignore[method-assign,assignment]
    try:
        r = post(running, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
        assert r.status_code == 200
        metrics = httpx.get(f"{running.url}/metrics").text
        e2e = next(line for line in metrics.splitlines()
                   if line.startswith("strata_e2e_request_latency_seconds_sum"))  # fmt: skip
        ttft = next(line for line in metrics.splitlines()
                    if line.startswith("strata_time_to_first_token_seconds_sum"))  # fmt: skip
        assert float(e2e.split()[1]) >= 0.5 and float(ttft.split()[1]) >= 0.5
    finally:
        running.stop()


def test_echo_prepends_the_prompt_text(server: RunningServer) -> None:
    tokenizer = server.engine.tokenizer
    ids = tokenizer("The capital of France").input_ids
    for prompt, text in ((ids, tokenizer.decode(ids)), ("Hi there", "Hi there")):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "echo": True, "n": 2}
        r = post(server, "/v1/completions", body)
        assert r.status_code == 200
        assert all(c["text"].startswith(text) for c in r.json()["choices"])
