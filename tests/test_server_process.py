"""The server with its engine in a process of its own (ProcessEngine, the default of
`strata serve`): the core server tests run against it unchanged (imported below, with
this module's fixtures), its answers equal the in-process server's token for token, and
faults, a dead engine process and shutdown end every request without a hang."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from strata.config import EngineConfig
from strata.engine.engine import LLMEngine
from strata.engine.llm import LLM
from strata.engine.outputs import RequestOutput
from strata.engine.sampling_params import SamplingParams
from tests.server_utils import RunningServer, engine_factory, process_engine, start_server
from tests.test_server import (  # noqa: F401  (collected here, against this module's server)
    LLM_KWARGS,
    MODEL,
    test_async_client_concurrent_requests_match_offline,
    test_cached_tokens_reported_from_prefix_cache,
    test_chat_greedy_equals_offline,
    test_chat_stream_concatenates_to_the_same_text,
    test_completion_greedy_equals_offline,
    test_completion_prompt_list_and_token_ids,
    test_completion_stream_raw_sse_ends_with_done,
    test_each_request_is_logged_once,
    test_echo_with_logprobs_scores_the_prompt,
    test_loglikelihood_requests_as_lm_eval_sends_them,
    test_logprobs_match_offline,
    test_metrics_count_requests_and_tokens,
    test_models_and_health,
    test_penalties_and_biases_equal_offline,
    test_seeded_sampling_is_reproducible_and_n_choices_differ,
    test_stop_string_ends_the_text,
)
from tests.test_server_errors import (  # noqa: F401
    assert_openai_error,
    post,
    test_client_disconnect_mid_stream_frees_blocks_at_once,
    test_invalid_chat_bodies_are_400,
    test_invalid_completion_parameters_are_400,
    test_malformed_json_is_422,
    test_non_streaming_disconnect_aborts,
    test_prompt_longer_than_context_names_both_lengths,
    test_unknown_fields_are_ignored,
    test_unknown_model_and_route_are_404,
)

POISON = 48000  # a prompt holding it fails its step (the request alone gets a 500)
FAULT = 48001  # a prompt holding it raises an engine fault (out of memory)


@pytest.fixture(scope="module")
def server(tiny_chat_folder: Path) -> Iterator[RunningServer]:
    running = start_server(process_engine(str(tiny_chat_folder), **LLM_KWARGS), model_name=MODEL)
    assert not running.in_process
    yield running
    running.stop()


@pytest.fixture(scope="module")
def offline(tiny_chat_folder: Path) -> LLM:
    return LLM(str(tiny_chat_folder), device="cpu", **LLM_KWARGS)


@pytest.fixture
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


# ---- the same answers as the in-process server -----------------------------------------------

BODIES: list[dict[str, Any]] = [
    {"prompt": "the river", "max_tokens": 12, "temperature": 0, "logprobs": 3},
    {"prompt": [5, 6, 7, 8], "max_tokens": 9, "temperature": 0.9, "seed": 11, "n": 3},
    {"prompt": "once upon", "max_tokens": 20, "temperature": 0, "stop": ["e"], "echo": True},
    {"prompt": "a b c", "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True},
    {"prompt": "penalties", "max_tokens": 10, "temperature": 0, "frequency_penalty": 1.5,
     "logit_bias": {"17": 50}, "return_token_ids": True},
    {"prompt": "json", "max_tokens": 16, "temperature": 0,
     "response_format": {"type": "json_object"}},
    {"prompt": "choose", "max_tokens": 8, "temperature": 0, "guided_choice": ["yes", "no"]},
]  # fmt: skip
CHAT = {"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 10, "temperature": 0,
        "logprobs": True, "top_logprobs": 2}  # fmt: skip


def _answers(url: str) -> list[Any]:
    """Every body, non-streamed and streamed, one at a time (a batch's shape changes the
    logits' last bits on CPU): the parts of each answer that must be equal."""

    def one(route: str, body: dict[str, Any], stream: bool) -> Any:
        body = {**body, "model": MODEL, "stream": stream}
        if not stream:
            r = httpx.post(f"{url}/v1/{route}", json=body, timeout=60)
            assert r.status_code == 200, r.text
            data = r.json()
            return [{k: v for k, v in c.items()} for c in data["choices"]], data["usage"]
        with httpx.stream("POST", f"{url}/v1/{route}", json=body, timeout=60) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        return _by_choice(events[:-1])

    jobs = [("completions", b, s) for b in BODIES for s in (False, True)]
    jobs += [("chat/completions", CHAT, s) for s in (False, True)]
    return [one(*job) for job in jobs]


def _by_choice(events: list[str]) -> dict[int, dict[str, Any]]:
    """Each choice's chunks joined into one (the choices of one step may interleave either
    way, and a stream that lags gets several tokens in one chunk: where chunks part
    depends on timing, not on the answer)."""
    joined: dict[int, dict[str, Any]] = {}
    for event in events:
        data = json.loads(event[len("data: ") :])
        for choice in data["choices"]:
            _join(joined.setdefault(choice["index"], {}), choice)
    return joined


def _join(into: dict[str, Any], part: dict[str, Any]) -> None:
    """Append a chunk's texts and lists to the choice so far; later scalars win."""
    for key, value in part.items():
        if isinstance(value, dict):
            if into.get(key) is None:
                into[key] = {}
            _join(into[key], value)
        elif isinstance(value, str | list) and key != "finish_reason":
            into[key] = (into.get(key) or type(value)()) + value
        elif value is not None or key not in into:
            into[key] = value


def test_answers_equal_the_in_process_server(tiny_chat_folder: Path) -> None:
    """Greedy, seeded, logprobs, stop strings, echo, penalties, grammars, chat: each answer,
    streamed and not, equals the in-process server's exactly (two fresh servers: the same
    prefix-cache history)."""
    answers = []
    for make in (engine_factory, process_engine):
        running = start_server(make(str(tiny_chat_folder), **LLM_KWARGS), model_name=MODEL)
        try:
            answers.append(_answers(running.url))
            running.assert_no_leaks()
        finally:
            running.stop()
    assert answers[1] == answers[0]


def test_a_request_id_in_flight_is_refused_as_in_process(server: RunningServer) -> None:
    """The in-process engine refuses a second request under an id in flight (its stream
    ends with the error); the first runs on."""
    engine = server.state.engine
    assert engine is not None
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)

    async def run() -> tuple[RequestOutput, RequestOutput]:
        first = await engine.prepare([5, 6], params, "dup")
        second = await engine.prepare([7, 8], params, "dup")
        [kept] = engine.submit([first])
        [refused] = engine.submit([second])
        refusal = [out async for out in refused]
        outputs = [out async for out in kept]
        return outputs[-1], refusal[-1]

    final, refusal = asyncio.run(run())
    assert (refusal.finish_reason, refusal.error) == ("error", "request id 'dup' is already in use")
    assert (final.finish_reason, len(final.token_ids)) == ("length", 50)
    server.assert_no_leaks()


# ---- faults ----------------------------------------------------------------------------------


def poisoned_engine(config: EngineConfig) -> LLMEngine:
    """LLMEngine whose model run raises for a step holding POISON (a failed step) or FAULT
    (an engine fault). Runs in the engine process: pickled by name."""
    engine = LLMEngine(config)
    execute = engine.runner.execute

    def failing(plan):  # type: ignore[no-untyped-def]
        tokens = {t for c in plan.chunks for t in c.seq.prompt_token_ids}
        if POISON in tokens:
            raise RuntimeError("injected fault")
        if FAULT in tokens:
            raise torch.OutOfMemoryError("injected out of memory")
        return execute(plan)

    engine.runner.execute = failing  # type: ignore[method-assign]
    return engine


@pytest.fixture
def poisoned(tiny_chat_folder: Path) -> Iterator[RunningServer]:
    engine = process_engine(str(tiny_chat_folder), make_engine=poisoned_engine, **LLM_KWARGS)
    running = start_server(engine, model_name=MODEL)
    yield running
    running.stop()


def test_a_failed_step_fails_its_requests_and_an_engine_fault_stops_the_engine(
    poisoned: RunningServer,
) -> None:
    r = post(poisoned, "/v1/completions", {"model": MODEL, "prompt": [POISON, 5], "max_tokens": 3})
    assert "injected fault" in assert_openai_error(r, 500)
    ok = post(poisoned, "/v1/completions", {"model": MODEL, "prompt": [7, 8], "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    poisoned.assert_no_leaks()
    body = {"model": MODEL, "prompt": [FAULT, 5], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{poisoned.url}/v1/completions", json=body, timeout=30) as s:
        lines = [line for line in s.iter_lines() if line]
    assert "the engine failed: OutOfMemoryError: injected out of memory" in lines[-2]
    assert lines[-1] == "data: [DONE]"
    health = httpx.get(f"{poisoned.url}/health")
    assert health.status_code == 503
    assert health.json() == {"status": "engine stopped after a fault"}
    r = post(poisoned, "/v1/completions", {"model": MODEL, "prompt": [7, 8], "max_tokens": 3})
    assert "stopped after a fault" in assert_openai_error(r, 503)


def test_a_dead_engine_process_fails_requests_in_flight(tiny_chat_folder: Path) -> None:
    engine = process_engine(str(tiny_chat_folder), **LLM_KWARGS)
    running = start_server(engine, model_name=MODEL)
    try:
        body = {"model": MODEL, "prompt": [5, 6], "max_tokens": 1000, "ignore_eos": True,
                "stream": True}  # fmt: skip
        with httpx.stream("POST", f"{running.url}/v1/completions", json=body, timeout=30) as s:
            lines = s.iter_lines()
            assert next(line for line in lines if line).startswith("data: ")
            assert engine.pid is not None
            os.kill(engine.pid, signal.SIGKILL)
            rest = [line for line in lines if line]
        assert "the engine process exited unexpectedly (exit code -9)" in rest[-2]
        assert rest[-1] == "data: [DONE]"
        health = httpx.get(f"{running.url}/health")
        assert health.status_code == 503
        r = post(running, "/v1/completions", {"model": MODEL, "prompt": [7], "max_tokens": 2})
        assert_openai_error(r, 503)
    finally:
        running.stop()


# ---- exits -----------------------------------------------------------------------------------


def _gone(pid: int, timeout: float) -> bool:
    """The process has exited (a zombie that nobody reaped yet counts as exited)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def test_the_engine_process_exits_with_the_server(tiny_chat_folder: Path) -> None:
    engine = process_engine(str(tiny_chat_folder), **LLM_KWARGS)
    running = start_server(engine, model_name=MODEL)
    pid = engine.pid
    assert pid is not None and not _gone(pid, 0)
    running.stop()
    assert _gone(pid, 1)


def test_an_orphaned_engine_process_exits(tiny_chat_folder: Path) -> None:
    """The front end killed outright (no shutdown): its engine process exits on its own."""
    script = textwrap.dedent(f"""
        from strata.config import EngineConfig
        from strata.engine.core.client import ProcessEngine
        from strata.options import build
        config = build(EngineConfig, {{"model": {str(tiny_chat_folder)!r}, "device": "cpu",
                                       "kv_cache_memory": 0.05, "max_model_len": 1024}})
        engine = ProcessEngine(config)
        engine.wait_loaded(120)
        print(engine.pid, flush=True)
        import time; time.sleep(120)
    """)
    front = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert front.stdout is not None
        pid = int(front.stdout.readline())
        front.kill()
        front.wait()
        assert _gone(pid, 5)
    finally:
        front.kill()
