"""`strata bench serve` and `strata bench throughput --url` against real Strata servers.

The servers are uvicorn on a loopback port with the engine on its own thread: the
embedded model for the 64-stream case, the tiny chat model (a millisecond a step) for
the command-line cases. Every test ends with the pool intact and no block leaked.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from strata.bench.arrivals import arrival_offsets
from strata.bench.client import (
    BenchmarkError,
    BenchRequest,
    ClientSet,
    RequestRecord,
    ServerTarget,
    http_client,
    send_request,
)
from strata.bench.client_load import ClientLoad, LagMonitor
from strata.bench.client_pool import ClientPool, split_cap
from strata.bench.latency import SLO, summarize
from strata.bench.requests import bench_requests
from strata.bench.serve import ServeBenchConfig, run_serve_bench
from strata.cli import main
from tests.server_utils import RunningServer, engine_factory, start_server

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def embedded_server() -> Iterator[RunningServer]:
    running = start_server(
        engine_factory(None, kv_cache_memory=0.5, max_model_len=1024), model_name="smol"
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def tiny_server(tiny_chat_folder: Path) -> Iterator[RunningServer]:
    factory = engine_factory(str(tiny_chat_folder), kv_cache_memory=0.05, max_model_len=1024)
    running = start_server(factory, model_name="tiny")
    yield running
    running.stop()


def test_64_concurrent_streams_complete_well_formed(
    embedded_server: RunningServer, tmp_path: Path
) -> None:
    config = ServeBenchConfig(
        url=embedded_server.url, num_requests=64, input_len=(16, 32), output_len=(8, 16),
        slo=SLO(ttft_ms=1e7, tpot_ms=1e7), json_path=str(tmp_path / "r.json"),
        plot_path=str(tmp_path / "r.png"), progress=False,
    )  # fmt: skip
    result = run_serve_bench(config)
    assert result.passed and result.model == "smol"
    (run,) = result.runs
    s = run.summary
    assert (s.completed, s.failed, s.lost) == (64, 0, 0)
    sent = bench_requests(64, (16, 32), (8, 16), "token-ids", seed=0)
    for record, request in zip(run.records, sent, strict=True):
        assert record.index == request.index and record.outcome == "ok", record.error
        assert record.usage_reported and record.content_chunks >= 1
        assert record.output_tokens == request.output_len  # ignore_eos: exactly max_tokens
        assert record.input_tokens == request.prompt_len
        assert len(record.itl_ms) == record.content_chunks - 1
        assert 0 < record.ttft_ms <= record.e2e_ms
    # rate inf: every request was sent before the first one finished, so 64 were in flight
    assert max(r.sent_s for r in run.records) * 1e3 < min(
        r.sent_s * 1e3 + r.e2e_ms for r in run.records
    )
    assert s.output_tokens == sum(r.output_len for r in sent)
    assert s.input_tokens == sum(r.prompt_len for r in sent)
    assert s.goodput == s.request_throughput  # every request meets the loose objectives
    assert s.ttft_ms.count == 64 and s.ttft_ms.p50 <= s.ttft_ms.p99
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passed"] and data["config"]["request_rates"] == ["inf"]
    assert data["runs"][0]["summary"]["completed"] == 64
    assert len(data["runs"][0]["requests"]) == 64
    assert (tmp_path / "r.png").read_bytes().startswith(PNG_MAGIC)
    embedded_server.assert_no_leaks()


def test_cli_sweep_over_rates_on_chat(
    tiny_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    code = main([
        "bench", "serve", "--url", tiny_server.url, "--endpoint", "chat",
        "--num-requests", "12", "--request-rate", "50", "inf", "--burstiness", "0.5",
        "--max-concurrency", "8", "--input-len", "8-24", "--output-len", "4-8",
        "--slo-ttft-ms", "60000", "--json", str(out), "--plot", str(plot), "--no-progress",
    ])  # fmt: skip
    assert code == 0
    report = capsys.readouterr().out
    assert "sweep" in report and "all requests completed" in report
    data = json.loads(out.read_text())
    assert data["config"]["prompts"] == "text" and data["model"] == "tiny"
    assert [r["request_rate"] for r in data["runs"]] == [50, "inf"]
    for run in data["runs"]:
        summary = run["summary"]
        assert (summary["completed"], summary["failed"], summary["lost"]) == (12, 0, 0)
        assert run["output_len_mismatches"] == 0 and run["failures"] == {}
        assert summary["goodput"] is not None and summary["tpot_ms"]["p99"] is not None
    assert plot.read_bytes().startswith(PNG_MAGIC)
    tiny_server.assert_no_leaks()


def test_cli_counts_failed_requests_and_exits_nonzero(
    tiny_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "failed.json"
    code = main(
        [
            "bench",
            "serve",
            "--url",
            tiny_server.url,
            "--num-requests",
            "4",
            "--input-len",
            "2000",
            "--output-len",
            "4",
            "--json",
            str(out),
            "--no-progress",
        ]
    )  # fmt: skip  (2000-token prompts: longer than the 1024-token context, so a 400)
    assert code == 1
    report = capsys.readouterr().out
    assert "0 / 4 / 0" in report and "NOT ALL REQUESTS COMPLETED" in report
    run = json.loads(out.read_text())["runs"][0]
    assert run["summary"]["failed"] == 4 and run["summary"]["ttft_ms"]["p50"] is None
    ((reason, count),) = run["failures"].items()
    assert count == 4 and reason.startswith("failed: HTTP 400")
    tiny_server.assert_no_leaks()


def test_cli_wrong_model_fails_before_the_run(
    tiny_server: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["bench", "serve", "--url", tiny_server.url, "--model", "nope", "--no-progress"])
    assert code == 2
    assert "HTTP 404" in capsys.readouterr().err


def test_throughput_over_http_writes_the_offline_json(
    tiny_server: RunningServer, tmp_path: Path
) -> None:
    out = tmp_path / "tp.json"
    code = main([
        "bench", "throughput", "--url", tiny_server.url, "--num-requests", "8",
        "--input-len", "8-16", "--output-len", "4-8", "--concurrency", "1", "4",
        "--json", str(out),
    ])  # fmt: skip
    assert code == 0
    sent = bench_requests(8, (8, 16), (4, 8), "token-ids", seed=0)
    rows = json.loads(out.read_text())["results"]
    assert [(r["engine"], r["concurrency"], r["num_requests"]) for r in rows] == [
        ("server", 1, 8), ("server", 4, 8),
    ]  # fmt: skip
    for row in rows:
        assert row["output_tokens"] == sum(r.output_len for r in sent)
        assert row["input_tokens"] == sum(r.prompt_len for r in sent)
        assert row["output_tokens_per_s"] > 0 and not math.isinf(row["seconds"])
    tiny_server.assert_no_leaks()


def test_a_request_past_its_timeout_is_lost_and_the_server_frees_it(
    tiny_server: RunningServer,
) -> None:
    request = BenchRequest(0, list(range(100, 116)), 16, output_len=900)
    target = ServerTarget(tiny_server.url, "tiny")

    async def send() -> RequestRecord:
        async with http_client(None, timeout_s=1e-4) as client:  # silent for 0.1 ms: lost
            return await send_request(client, target, request, time.perf_counter())

    record = asyncio.run(send())
    assert record.outcome == "lost" and "timeout" in (record.error or "")
    summary = summarize([], num_requests=1, failed=0, duration_s=1.0, slo=SLO())
    assert (summary.completed, summary.failed, summary.lost) == (0, 0, 1)
    tiny_server.assert_no_leaks()  # the server aborted it when the client went away


def test_two_client_processes_send_each_request_once_at_its_arrival(
    tiny_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pool.json"
    code = main([
        "bench", "serve", "--url", tiny_server.url, "--num-requests", "12",
        "--request-rate", "40", "--input-len", "8-16", "--output-len", "4-8",
        "--client-processes", "2", "--max-concurrency", "3", "--json", str(out),
        "--no-progress",
    ])  # fmt: skip
    assert code == 0
    assert "client: 2 processes" in capsys.readouterr().out
    run = json.loads(out.read_text())["runs"][0]
    sent = bench_requests(12, (8, 16), (4, 8), "token-ids", seed=0)
    offsets = arrival_offsets(12, 40.0, 1.0, seed=0)
    records = run["requests"]
    assert [r["index"] for r in records] == list(range(12))  # merged in request order
    for record, request, offset in zip(records, sent, offsets, strict=True):
        assert record["outcome"] == "ok", record["error"]
        assert record["output_tokens"] == request.output_len
        assert record["input_tokens"] == request.prompt_len
        assert record["sent_s"] >= offset  # one clock and one start for both processes
    client = run["client"]
    assert client["processes"] == 2 and client["wall_s"] > 0 and client["cpu_s"] > 0
    assert run["summary"]["completed"] == 12
    tiny_server.assert_no_leaks()


def test_a_dead_client_process_stops_the_run(tiny_server: RunningServer) -> None:
    target = ServerTarget(tiny_server.url, "tiny")
    pool = ClientPool(2, target, None, timeout_s=60)
    try:
        worker, _ = pool._workers[1]
        worker.kill()
        worker.join(5)
        requests = bench_requests(4, (8, 8), (4, 4), "token-ids", seed=0)
        with pytest.raises(BenchmarkError, match="client process 1 exited"):
            asyncio.run(pool.run(requests, [0.0] * 4, lambda done: None))
    finally:
        pool.close()
    assert pool._workers == []
    tiny_server.assert_no_leaks()


def test_client_processes_flags_are_checked() -> None:
    base = {"url": "http://127.0.0.1:1"}
    with pytest.raises(ValueError, match="--client-processes must be >= 1, got 0"):
        ServeBenchConfig(**base, client_processes=0)
    with pytest.raises(ValueError, match="--max-concurrency 1 is split over the client"):
        ServeBenchConfig(**base, client_processes=2, max_concurrency=1)
    assert split_cap(5, 2) == [3, 2] and split_cap(4, 4) == [1, 1, 1, 1]
    assert split_cap(None, 3) == [None, None, None]


def test_the_lag_monitor_sees_a_blocked_loop() -> None:
    async def block() -> LagMonitor:
        async with LagMonitor() as monitor:
            await asyncio.sleep(0.02)
            time.sleep(0.06)  # the loop cannot wake the monitor for 60 ms
            await asyncio.sleep(0.02)
        return monitor

    monitor = asyncio.run(block())
    load = ClientLoad.of([monitor])
    assert load.lag_max_ms >= 50 and load.processes == 1 and load.wall_s >= 0.1
    quiet = ClientLoad(processes=2, cpu_s=1.0, wall_s=2.0, lag_p99_ms=3.0, lag_max_ms=9.0)
    assert quiet.cpu_share == 0.25 and not quiet.lagged
    assert quiet.describe() == (
        "2 processes, CPU 25% of a core each, loop lag p99 3.0 ms, max 9.0 ms"
    )
    busy = ClientLoad(processes=1, cpu_s=1.0, wall_s=1.0, lag_p99_ms=12.0, lag_max_ms=40.0)
    assert busy.lagged and "THE CLIENT LAGGED" in busy.describe()


def test_client_set_gives_each_request_in_flight_its_own_client() -> None:
    async def use() -> None:
        async with ClientSet(timeout_s=5) as clients:
            clients.reserve(2)
            async with clients.client() as a, clients.client() as b:
                assert a is not b
                async with clients.client() as c:  # a third request in flight: a new one
                    assert c is not a and c is not b
            async with clients.client() as again:  # released clients are reused
                assert again in (a, b, c)
            clients.reserve(2)  # there are 3 already: nothing is built
            assert len({id(x) for x in clients._all}) == 3
        assert a.is_closed and b.is_closed and c.is_closed

    asyncio.run(use())


def test_throughput_over_http_from_two_client_processes(
    tiny_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tp2.json"
    code = main([
        "bench", "throughput", "--url", tiny_server.url, "--num-requests", "10",
        "--input-len", "8-16", "--output-len", "4-8", "--concurrency", "2", "5",
        "--client-processes", "2", "--json", str(out),
    ])  # fmt: skip
    assert code == 0
    sent = bench_requests(10, (8, 16), (4, 8), "token-ids", seed=0)
    rows = json.loads(out.read_text())["results"]
    assert [(r["concurrency"], r["num_requests"]) for r in rows] == [(2, 10), (5, 10)]
    for row in rows:
        assert row["output_tokens"] == sum(r.output_len for r in sent)
        assert row["input_tokens"] == sum(r.prompt_len for r in sent)
    assert "2 client process(es)" in capsys.readouterr().out
    bad = main([
        "bench", "throughput", "--url", tiny_server.url, "--concurrency", "1",
        "--client-processes", "2",
    ])  # fmt: skip
    assert bad == 2
    assert "--concurrency 1 is split over the client processes" in capsys.readouterr().err
    tiny_server.assert_no_leaks()
