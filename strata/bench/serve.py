"""`strata bench serve`: an open-loop load test of any OpenAI-compatible server.

Requests are sent at arrival times drawn for each --request-rate (Poisson, or gamma with
--burstiness), streamed, timed chunk by chunk and checked for format. Each rate is a
separate run over a fresh workload (seed + run index, so prompts do not hit the prefix
cache of an earlier run); the same flags replay the same requests against any server.

Every request ends in exactly one of: completed, failed, lost. A run passes only when
every request completed; the command exits 1 otherwise.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import httpx
from tqdm.auto import tqdm

from strata.bench.arrivals import arrival_offsets, rate_label
from strata.bench.client import (
    BenchmarkError,
    BenchRequest,
    Endpoint,
    RequestRecord,
    ServerTarget,
    http_client,
    send_request,
    served_model,
)
from strata.bench.latency import SLO, Summary, summarize
from strata.bench.requests import DEFAULT_VOCAB_SIZE, PromptKind, bench_requests
from strata.bench.serve_report import format_report, report_title


@dataclass(frozen=True)
class ServeBenchConfig:
    url: str
    num_requests: int = 200
    request_rates: tuple[float, ...] = (math.inf,)
    burstiness: float = 1.0
    max_concurrency: int | None = None
    input_len: tuple[int, int] = (100, 1024)
    output_len: tuple[int, int] = (100, 1024)
    endpoint: Endpoint = "completions"
    prompts: PromptKind | None = None  # None: token-ids on completions, text on chat
    model: str | None = None  # None: the first model the server lists
    api_key: str | None = None
    vocab_size: int = DEFAULT_VOCAB_SIZE
    temperature: float = 0.0
    seed: int = 0
    slo: SLO = field(default_factory=SLO)
    request_timeout_s: float = 3600.0
    json_path: str | None = None
    plot_path: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"--url must start with http:// or https://, got {self.url!r}")
        if self.num_requests < 1:
            raise ValueError(f"--num-requests must be >= 1, got {self.num_requests}")
        if not self.request_rates:
            raise ValueError("give at least one --request-rate")
        for rate in self.request_rates:
            arrival_offsets(0, rate, self.burstiness, self.seed)  # validates rate and burstiness
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if self.endpoint == "chat" and self.prompts == "token-ids":
            raise ValueError("the chat endpoint takes text; use --prompts text")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.vocab_size <= 100:
            raise ValueError(f"--vocab-size must be > 100, got {self.vocab_size}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"--request-timeout must be > 0, got {self.request_timeout_s}")
        for name, value in (
            ("--slo-ttft-ms", self.slo.ttft_ms),
            ("--slo-tpot-ms", self.slo.tpot_ms),
        ):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")

    @property
    def prompt_kind(self) -> PromptKind:
        if self.prompts is not None:
            return self.prompts
        return "token-ids" if self.endpoint == "completions" else "text"

    def as_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body.update(
            request_rates=[rate_label(r) if math.isinf(r) else r for r in self.request_rates],
            prompts=self.prompt_kind,
            api_key="***" if self.api_key else None,
        )
        return body


@dataclass(frozen=True)
class RateRun:
    """One run at one request rate."""

    request_rate: float
    summary: Summary
    records: list[RequestRecord]

    @property
    def passed(self) -> bool:
        return self.summary.failed == 0 and self.summary.lost == 0

    def failure_reasons(self) -> Counter[str]:
        return Counter(f"{r.outcome}: {r.error}" for r in self.records if r.outcome != "ok")

    def output_len_mismatches(self) -> int:
        ok = (r for r in self.records if r.outcome == "ok")
        return sum(r.output_tokens != r.expected_output_tokens for r in ok)

    def cached_tokens(self) -> int:
        return sum(r.cached_tokens or 0 for r in self.records if r.outcome == "ok")

    def as_dict(self) -> dict[str, Any]:
        rate = self.request_rate
        return {
            "request_rate": rate_label(rate) if math.isinf(rate) else rate,
            "summary": self.summary.as_dict(),
            "cached_tokens": self.cached_tokens(),
            "output_len_mismatches": self.output_len_mismatches(),
            "failures": dict(self.failure_reasons()),
            "requests": [r.as_dict() for r in self.records],
        }


@dataclass(frozen=True)
class ServeBenchResult:
    config: ServeBenchConfig
    model: str
    started_at: str
    runs: list[RateRun]

    @property
    def passed(self) -> bool:
        return all(run.passed for run in self.runs)

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.as_dict(),
            "model": self.model,
            "started_at": self.started_at,
            "passed": self.passed,
            "runs": [run.as_dict() for run in self.runs],
        }


def run_serve_bench(config: ServeBenchConfig) -> ServeBenchResult:
    """Run every rate of `config`, print the report, write the JSON and plot if asked."""
    result = asyncio.run(_run_all(config))
    print(format_report(result))
    if config.json_path:
        with open(config.json_path, "w") as f:
            json.dump(result.as_dict(), f, indent=1)
    if config.plot_path:
        from strata.bench.plot import plot_run, plot_sweep  # matplotlib only when plotting

        title = report_title(result)
        if len(result.runs) == 1:
            plot_run(result.runs[0].records, config.plot_path, title)
        else:
            rates = [run.request_rate for run in result.runs]
            plot_sweep(rates, [run.summary for run in result.runs], config.plot_path, title)
    return result


async def _run_all(config: ServeBenchConfig) -> ServeBenchResult:
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    async with http_client(config.max_concurrency, config.request_timeout_s) as client:
        model = config.model or await served_model(client, config.url, config.api_key)
        target = ServerTarget(
            config.url, model, config.endpoint, config.api_key, config.temperature
        )
        await _check_server(client, target, config)
        runs = []
        for index, rate in enumerate(config.request_rates):
            requests = bench_requests(
                config.num_requests, config.input_len, config.output_len, config.prompt_kind,
                config.seed + index, config.vocab_size,
            )  # fmt: skip
            offsets = arrival_offsets(len(requests), rate, config.burstiness, config.seed + index)
            records, duration = await _run_rate(client, target, requests, offsets, rate, config)
            completed = [r.completed() for r in records if r.outcome == "ok"]
            failed = sum(r.outcome == "failed" for r in records)
            summary = summarize(completed, len(requests), failed, duration, config.slo)
            runs.append(RateRun(rate, summary, records))
    return ServeBenchResult(config, model, started_at, runs)


async def _check_server(
    client: httpx.AsyncClient, target: ServerTarget, config: ServeBenchConfig
) -> None:
    """One short request first: a wrong URL, model or key fails here, with the reason, and
    the server's first-request costs stay out of the numbers."""
    seed = config.seed + len(config.request_rates)  # no run uses this seed
    probe = bench_requests(1, (16, 16), (4, 4), config.prompt_kind, seed, config.vocab_size)[0]
    record = await send_request(client, target, probe, time.perf_counter())
    if record.outcome != "ok":
        raise BenchmarkError(f"the test request to {target.route} {record.outcome}: {record.error}")


async def _run_rate(
    client: httpx.AsyncClient,
    target: ServerTarget,
    requests: list[BenchRequest],
    offsets: list[float],
    rate: float,
    config: ServeBenchConfig,
) -> tuple[list[RequestRecord], float]:
    """Send each request at its offset (waiting for a --max-concurrency slot if set);
    returns the records in request order and the seconds from the first send to the
    last answer."""
    gate = asyncio.Semaphore(config.max_concurrency or len(requests))
    desc = f"rate {rate_label(rate)} req/s"
    with tqdm(total=len(requests), desc=desc, disable=not config.progress) as bar:
        start = time.perf_counter()

        async def one(request: BenchRequest, offset: float) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            async with gate:
                record = await send_request(client, target, request, start)
            bar.update(1)
            return record

        records = await asyncio.gather(*map(one, requests, offsets))
        duration = time.perf_counter() - start
    return list(records), duration
