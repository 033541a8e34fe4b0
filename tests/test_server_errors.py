"""Bad input, backpressure, disconnects, engine failures and loading, over real HTTP."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from strata.engine.engine import LLMEngine
from tests.server_utils import ENGINES, RunningServer, engine_factory, start_server

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


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> str:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return str(error["message"])


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "temperature": 3}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 17}, "n"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "stop": 5}, "stop"),
        ({"prompt": 3.5}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "x", "frequency_penalty": 2.5}, "frequency_penalty"),
        ({"prompt": "x", "presence_penalty": -2.01}, "presence_penalty"),
        ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
        ({"prompt": "x", "logit_bias": {"49152": 1.0}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"5": 100.5}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"five": 1.0}}, "logit_bias"),
        ({"prompt": "x", "min_p": 2}, "min_p"),
        ({"prompt": "x", "min_tokens": 20, "max_tokens": 5}, "min_tokens"),
        ({"prompt": "x", "suffix": "tail"}, "suffix"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": [99999999]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ""}, "prompt"),
    ],
)
def test_invalid_completion_parameters_are_400(
    server: RunningServer, body: dict[str, object], param: str
) -> None:
    r = post(server, "/v1/completions", {"model": MODEL, **body})
    assert_openai_error(r, 400, param)


def test_invalid_chat_bodies_are_400(server: RunningServer) -> None:
    url = "/v1/chat/completions"
    assert_openai_error(post(server, url, {"model": MODEL, "messages": []}), 400, "messages")
    bad_role = {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}
    assert_openai_error(post(server, url, bad_role), 400)
    tools = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{}]}
    assert_openai_error(post(server, url, tools), 400, "tools")
    image = {
        "model": MODEL,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
    }
    assert_openai_error(post(server, url, image), 400, "messages")
    top = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}
    assert_openai_error(post(server, url, top), 400, "top_logprobs")


def test_unknown_fields_are_ignored(server: RunningServer) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2, "metadata": {"a": 1}, "zzz": [1]}
    assert post(server, "/v1/completions", body).status_code == 200


def test_prompt_longer_than_context_names_both_lengths(server: RunningServer) -> None:
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": list(range(1, 1101))})
    message = assert_openai_error(r, 400, "prompt")
    assert "1100" in message and "1024" in message
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": [5] * 1000, "max_tokens": 100})
    message = assert_openai_error(r, 400)
    assert "1000" in message and "1024" in message
    server.assert_no_leaks()


def test_unknown_model_and_route_are_404(server: RunningServer) -> None:
    r = post(server, "/v1/completions", {"model": "gpt-9", "prompt": "x"})
    assert_openai_error(r, 404, "model")
    assert r.json()["error"]["code"] == "model_not_found"
    assert_openai_error(httpx.get(f"{server.url}/v1/nothing"), 404)
    assert_openai_error(httpx.get(f"{server.url}/v1/completions"), 405)


def test_malformed_json_is_422(server: RunningServer) -> None:
    r = httpx.post(
        f"{server.url}/v1/completions",
        content=b'{"model": "tiny", "prompt": ',
        headers={"content-type": "application/json"},
    )
    assert_openai_error(r, 422)


def test_api_key_is_required_when_set(tiny_chat_folder: Path) -> None:
    running = start_server(
        engine_factory(str(tiny_chat_folder), **LLM_KWARGS), model_name=MODEL, api_key="sekret"
    )
    try:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
        assert_openai_error(post(running, "/v1/completions", body), 401)
        wrong = {"Authorization": "Bearer nope"}
        assert_openai_error(post(running, "/v1/completions", body, headers=wrong), 401)
        assert httpx.get(f"{running.url}/health").status_code == 200
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="sekret", max_retries=0)
        assert client.completions.create(model=MODEL, prompt="x", max_tokens=1).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{running.url}/v1", api_key="bad", max_retries=0).models.list()
    finally:
        running.stop()


def test_full_waiting_queue_is_429_with_retry_after(tiny_chat_folder: Path) -> None:
    running = start_server(
        engine_factory(str(tiny_chat_folder), max_num_seqs=1, **LLM_KWARGS),
        model_name=MODEL,
        max_waiting_requests=2,
    )
    long = {"model": MODEL, "prompt": "x", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(base_url=running.url, timeout=30) as http:
            streams = [http.stream("POST", "/v1/completions", json=long) for _ in range(3)]
            assert streams[0].__enter__().status_code == 200
            deadline = time.monotonic() + 10
            while running.state.engine.stats_snapshot["num_running"] != 1:  # type: ignore[union-attr]
                assert time.monotonic() < deadline
                time.sleep(0.01)
            # max_num_seqs=1: the first runs, the next two wait and fill the queue
            assert [s.__enter__().status_code for s in streams[1:]] == [200, 200]
            r = http.post("/v1/completions", json={"model": MODEL, "prompt": "y"})
            assert_openai_error(r, 429)
            assert int(r.headers["retry-after"]) >= 1
            for s in streams:
                s.__exit__(None, None, None)
        running.assert_no_leaks()
    finally:
        running.stop()


def test_client_disconnect_mid_stream_frees_blocks_at_once(server: RunningServer) -> None:
    body = {"model": MODEL, "prompt": "go", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    before = server.stats()["num_generated_tokens"]
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert all(line.startswith("data: ") or not line for line in got)
        assert server.stats()["kv_blocks_free"] < server.stats()["kv_blocks_total"]
    server.wait_idle(timeout=5)
    generated = server.stats()["num_generated_tokens"] - before
    assert generated < 1000  # aborted, not run to the end
    server.assert_no_leaks()


def test_non_streaming_disconnect_aborts(server: RunningServer) -> None:
    body = {"model": MODEL, "prompt": "go", "max_tokens": 1000, "ignore_eos": True}
    before = server.stats()["num_generated_tokens"]
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", body, timeout=0.3)
    server.wait_idle(timeout=5)
    assert server.stats()["num_generated_tokens"] - before < 1000
    server.assert_no_leaks()


POISON = 48000


def poison_runner(engine: LLMEngine) -> None:
    """Make the engine's model run raise for any step that holds a POISON prompt token."""
    execute = engine.runner.execute

    def failing(plan):  # type: ignore[no-untyped-def]
        if any(POISON in c.seq.prompt_token_ids for c in plan.chunks):
            raise RuntimeError("injected fault")
        return execute(plan)

    engine.runner.execute = failing  # type: ignore[method-assign]


def test_engine_failure_fails_only_its_requests_with_500(server: RunningServer) -> None:
    poison_runner(server.engine)
    try:
        r = post(
            server, "/v1/completions", {"model": MODEL, "prompt": [POISON, 5], "max_tokens": 3}
        )
        message = assert_openai_error(r, 500)
        assert "injected fault" in message
        body = {"model": MODEL, "prompt": [POISON, 6], "max_tokens": 3, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as s:
            lines = [line for line in s.iter_lines() if line]
        assert "injected fault" in lines[-2] and lines[-1] == "data: [DONE]"
        server.assert_no_leaks()
        ok = post(server, "/v1/completions", {"model": MODEL, "prompt": [7, 8], "max_tokens": 3})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    finally:
        del server.engine.runner.execute  # back to the class's method
    server.assert_no_leaks()


def test_health_is_503_until_the_model_has_loaded(tiny_chat_folder: Path) -> None:
    release = threading.Event()
    make = engine_factory(str(tiny_chat_folder), **LLM_KWARGS)

    def slow() -> LLMEngine:
        release.wait(30)
        return make()

    running = start_server(slow, model_name=MODEL, wait_ready=False)
    try:
        health = httpx.get(f"{running.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        r = httpx.post(f"{running.url}/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert_openai_error(r, 503)
        assert "retry-after" in r.headers
        release.set()
        deadline = time.monotonic() + 60
        while httpx.get(f"{running.url}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.post(
            f"{running.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}
        )
        assert r.status_code == 200
    finally:
        release.set()
        running.stop()


@pytest.mark.parametrize("placement", ["thread", "process"])
def test_failed_load_is_reported_by_health(tmp_path: Path, placement: str) -> None:
    running = start_server(ENGINES[placement](str(tmp_path / "missing")), wait_ready=False)
    try:
        deadline = time.monotonic() + 60
        while running.state.load_error is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        health = httpx.get(f"{running.url}/health")
        assert health.status_code == 503 and "does not exist" in health.json()["status"]
        r = httpx.post(f"{running.url}/v1/completions", json={"prompt": "x"})
        assert "does not exist" in assert_openai_error(r, 503)
    finally:
        running.stop()
