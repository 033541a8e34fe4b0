"""`strata serve --api-server-count N`: N HTTP front processes on one port, one engine
process (strata/server/api_fronts.py). Real processes: the answers equal one front's,
requests land on every front, each front's requests are its own (aborts, duplicate ids),
and shutdown (a signal, or the parent killed outright) leaves no process behind."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from strata.config import EngineConfig
from strata.engine.core.channels import EngineChannels, pid_alive
from strata.engine.core.client import ProcessEngine, SharedEngine
from strata.engine.core.process import spawn_engine_process
from strata.engine.engine import LLMEngine
from strata.engine.front import RequestStream
from strata.engine.outputs import RequestOutput
from strata.engine.sampling_params import SamplingParams
from strata.options import build
from strata.server.config import ServeConfig
from tests.server_utils import free_port, process_engine, start_server
from tests.test_server import LLM_KWARGS, MODEL
from tests.test_server_shutdown import wait_healthy

FRONT = "x-strata-front"


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (children of children included)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, parent in parents.items() if parent in frontier]
        found += kids
        frontier = kids
    return found


def all_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def start_fronts(folder: Path, n: int = 2, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "strata.cli", "serve", "--model", str(folder),
        "--served-model-name", MODEL, "--port", str(port), "--device", "cpu",
        "--kv-cache-memory", "0.05", "--max-model-len", "1024", "--api-server-count", str(n),
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc)
    return proc, url


def stop(proc: subprocess.Popen[bytes]) -> str:
    """SIGTERM, then the log; the exit status must be 0 and no process left behind."""
    pids = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(60)
    log = proc.stderr.read().decode() if proc.stderr else ""
    assert code == 0, log[-3000:]
    assert all_gone(pids, 5), (pids, log[-3000:])
    return log


@pytest.fixture(scope="module")
def fronts(tiny_chat_folder: Path) -> Iterator[str]:
    proc, url = start_fronts(tiny_chat_folder)
    try:
        yield url
    finally:
        if proc.poll() is None:
            stop(proc)


# ---- answers ---------------------------------------------------------------------------------

PROMPTS = [f"story number {i} begins" for i in range(6)]


async def _ask(url: str, route: str, prompt: str, stream: bool) -> tuple[str, str]:
    """(text, the front that answered), through the official client."""
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
        if route == "chat":
            msgs: Any = [{"role": "user", "content": prompt}]
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=msgs, max_tokens=8, temperature=0, stream=stream
            )
            parsed: Any = raw.parse()
            if stream:
                text = "".join([c.choices[0].delta.content or "" async for c in parsed])
            else:
                text = parsed.choices[0].message.content
        else:
            raw = await client.completions.with_raw_response.create(
                model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=stream
            )
            parsed = raw.parse()
            if stream:
                text = "".join([c.choices[0].text async for c in parsed])
            else:
                text = parsed.choices[0].text
        return text, raw.headers.get(FRONT, "")


JOBS = [(route, p, s) for route in ("completions", "chat") for p in PROMPTS for s in (False, True)]


def test_concurrent_answers_equal_one_fronts(fronts: str, tiny_chat_folder: Path) -> None:
    """Completions and chat, streamed and not, all at once over two fronts: each greedy
    text equals the single-front server's (asked one at a time)."""

    async def concurrently(url: str) -> list[tuple[str, str]]:
        return await asyncio.gather(*(_ask(url, *job) for job in JOBS))

    single = start_server(process_engine(str(tiny_chat_folder), **LLM_KWARGS), model_name=MODEL)
    try:
        expected = [asyncio.run(_ask(single.url, *job))[0] for job in JOBS]
    finally:
        single.stop()
    answers = asyncio.run(concurrently(fronts))
    assert [text for text, _ in answers] == expected
    assert {front for _, front in answers} <= {"0", "1"}


def test_requests_land_on_every_front_and_each_reports_engine_stats(fronts: str) -> None:
    seen: dict[str, str] = {}  # front -> its /metrics

    async def scrape() -> None:
        async with httpx.AsyncClient() as client:  # one connection each, all at once
            rs = await asyncio.gather(*(client.get(f"{fronts}/metrics") for _ in range(16)))
        for r in rs:
            seen[r.headers[FRONT]] = r.text

    for _ in range(20):
        asyncio.run(scrape())
        if len(seen) == 2:
            break
    assert sorted(seen) == ["0", "1"]
    for front, text in seen.items():
        assert re.search(rf'strata_api_front_info{{front="{front}",pid="\d+"}} 1\.0', text)
        assert re.search(r"^strata_kv_blocks_total [1-9]", text, re.M), text  # engine-wide
    totals = {re.search(r"^strata_kv_blocks_total (\S+)", t, re.M)[1] for t in seen.values()}  # type: ignore[index]
    assert len(totals) == 1


def test_a_dropped_stream_on_one_front_leaves_the_others(fronts: str) -> None:
    """Streams on both fronts; every stream on front 0 is dropped mid-way: those on front 1
    run to their end, and the engine frees everything."""
    body = {"model": MODEL, "prompt": "go on", "max_tokens": 120, "ignore_eos": True,
            "stream": True}  # fmt: skip
    opened: list[tuple[httpx.Client, httpx.Response]] = []
    try:
        for _ in range(40):
            client = httpx.Client(timeout=60)
            r = client.send(client.build_request("POST", f"{fronts}/v1/completions", json=body),
                            stream=True)  # fmt: skip
            opened.append((client, r))
            if len({resp.headers[FRONT] for _, resp in opened}) == 2 and len(opened) >= 4:
                break
        lines = {id(r): r.iter_lines() for _, r in opened}
        for _, r in opened:  # every stream has started
            assert next(line for line in lines[id(r)] if line).startswith("data: ")
        for client, r in opened:
            if r.headers[FRONT] == "0":
                r.close()
                client.close()
        kept = [(c, r) for c, r in opened if r.headers[FRONT] == "1"]
        assert kept
        for _, r in kept:
            rest = [line for line in lines[id(r)] if line]
            assert rest[-1] == "data: [DONE]"
            assert '"finish_reason":"length"' in rest[-2].replace(" ", "")
    finally:
        for client, r in opened:
            r.close()
            client.close()
    _wait_engine_idle(fronts)


def _wait_engine_idle(url: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(f"{url}/metrics").text
        running = re.search(r"^strata_num_requests_running (\S+)", text, re.M)
        free = re.search(r"^strata_kv_blocks_free (\S+)", text, re.M)
        total = re.search(r"^strata_kv_blocks_total (\S+)", text, re.M)
        assert running and free and total
        if float(running[1]) == 0 and free[1] == total[1]:
            return
        assert time.monotonic() < deadline, text
        time.sleep(0.1)


# ---- routing in the engine process -----------------------------------------------------------


def test_one_engine_routes_each_fronts_requests_to_it_alone(
    tiny_chat_folder: Path, tmp_path: Path
) -> None:
    """Two ProcessEngine clients on one engine process: an id in flight from one front is
    refused to the other (never cross-delivered); an abort or fail_all from one front
    leaves the other's requests running; the engine exits once both fronts have left."""
    config = build(EngineConfig, {"model": str(tiny_chat_folder), "device": "cpu", **LLM_KWARGS})
    channels = EngineChannels.in_dir(str(tmp_path), 2)
    process = spawn_engine_process(config, LLMEngine, channels, logging.WARNING)
    assert process.pid is not None
    a, b = (ProcessEngine(SharedEngine(ch, process.pid)) for ch in channels.fronts)
    try:
        a.wait_loaded(120)
        b.wait_loaded(120)
        same_a, refused, own_b = asyncio.run(_duplicates_and_aborts(a, b))
        failed_a, kept_b = asyncio.run(_fail_all(a, b))
    finally:
        a.shutdown()
        b.shutdown()
    assert refused.finish_reason == "error"
    assert refused.error == "request id 'same' is already in use"
    assert (same_a.finish_reason, len(same_a.token_ids)) == ("length", 40)
    assert (own_b.finish_reason, len(own_b.token_ids)) == ("length", 40)
    assert (failed_a.finish_reason, failed_a.error) == ("error", "a fails its own")
    assert (kept_b.finish_reason, len(kept_b.token_ids)) == ("length", 200)
    process.join(10)
    assert process.exitcode == 0


async def _duplicates_and_aborts(a: ProcessEngine, b: ProcessEngine) -> list[RequestOutput]:
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    [first] = a.submit([await a.prepare([5, 6], params, "same")])
    [twin] = b.submit([await b.prepare([7, 8], params, "same")])
    [other] = b.submit([await b.prepare([9, 10], params, "b-own")])
    refusal = [out async for out in twin]
    b.abort("same")  # not b's: ignored
    a.abort("b-own")  # not a's: ignored
    return [await _last(first), refusal[-1], await _last(other)]


async def _fail_all(a: ProcessEngine, b: ProcessEngine) -> list[RequestOutput]:
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    [on_a] = a.submit([await a.prepare([5, 6], params, "on-a")])
    [on_b] = b.submit([await b.prepare([7, 8], params, "on-b")])
    await on_a.__anext__()
    a.fail_all("a fails its own")
    return [await _last(on_a), await _last(on_b)]


async def _last(stream: RequestStream) -> RequestOutput:
    return [out async for out in stream][-1]


# ---- lifecycle -------------------------------------------------------------------------------


def test_sigterm_drains_every_front_then_stops_the_engine(tiny_chat_folder: Path) -> None:
    proc, url = start_fronts(tiny_chat_folder)
    pids = descendants(proc.pid)
    try:
        body = {"model": MODEL, "prompt": "drain", "max_tokens": 150, "ignore_eos": True,
                "stream": True}  # fmt: skip
        clients = [httpx.Client(timeout=60) for _ in range(6)]
        streams = [
            c.send(c.build_request("POST", f"{url}/v1/completions", json=body), stream=True)
            for c in clients
        ]
        iters = [s.iter_lines() for s in streams]
        for it in iters:
            assert next(line for line in it if line).startswith("data: ")
        proc.send_signal(signal.SIGTERM)
        for it in iters:  # each front drains its own streams to the end
            assert [line for line in it if line][-1] == "data: [DONE]"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stderr.read().decode() if proc.stderr else ""
    assert "2 HTTP front processes on http://127.0.0.1:" in log
    assert "one engine process" in log and "received SIGTERM: draining 2 HTTP fronts" in log
    assert all_gone(pids, 5), (pids, log[-3000:])
    assert len(pids) >= 3  # the engine and both fronts were there


def test_a_killed_parent_leaves_no_process_behind(tiny_chat_folder: Path) -> None:
    proc, _ = start_fronts(tiny_chat_folder)
    pids = descendants(proc.pid)
    proc.kill()
    proc.wait()
    assert all_gone(pids, 15), pids


def test_bad_api_server_count_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="--api-server-count must be >= 1, got 0"):
        ServeConfig(api_server_count=0)
    with pytest.raises(ValueError, match="leave out --engine-in-process"):
        ServeConfig(api_server_count=2, engine_in_process=True)
    with pytest.raises(ValueError, match="with --replicas"):
        ServeConfig(api_server_count=2, replicas=2)
    assert ServeConfig(api_server_count=4).api_server_count == 4
    cmd = [sys.executable, "-m", "strata.cli", "serve", "--api-server-count", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "strata: error: --api-server-count must be >= 1, got 0" in r.stderr


def slow_engine(config: EngineConfig) -> LLMEngine:
    """LLMEngine that takes a few seconds more to load (pickled by name to the engine)."""
    time.sleep(4)
    return LLMEngine(config)


async def _health_round(url: str) -> list[tuple[int, Any, str]]:
    """/health asked on 8 connections at once: (status, body, front) of each answer."""
    async with httpx.AsyncClient(timeout=2) as client:
        rs = await asyncio.gather(*(client.get(url) for _ in range(8)), return_exceptions=True)
    answers = [r for r in rs if isinstance(r, httpx.Response)]
    return [(r.status_code, r.json(), r.headers[FRONT]) for r in answers]


def test_every_front_answers_503_until_the_engine_has_loaded(tiny_chat_folder: Path) -> None:
    port = free_port()
    script = f"""
import logging, sys
from strata.config import EngineConfig
from strata.options import build
from strata.server.api_fronts import serve_fronts
from strata.server.config import ServeConfig
from tests.test_server_fronts import slow_engine
logging.basicConfig(level="INFO")
engine = build(EngineConfig, {{"model": {str(tiny_chat_folder)!r}, "device": "cpu",
                              "kv_cache_memory": 0.05, "max_model_len": 1024}})
config = ServeConfig(port={port}, api_server_count=2)
sys.exit(serve_fronts(engine, "tiny", config, "INFO", make_engine=slow_engine))
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/health"
    loading: set[str] = set()
    try:
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline and proc.poll() is None
            answers = asyncio.run(_health_round(url))
            if not answers:
                time.sleep(0.05)  # the fronts do not accept yet
                continue
            if any(status == 200 for status, _, _ in answers):
                break
            for status, body, front in answers:
                assert (status, body) == (503, {"status": "loading"})
                loading.add(front)
        assert loading == {"0", "1"}  # both fronts answered while the engine loaded
        pids = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert all_gone(pids, 5)
    finally:
        if proc.poll() is None:
            proc.kill()

