"""`strata bench serve`: an open-loop load test of any OpenAI-compatible server.

Requests are sent at arrival times drawn for each --request-rate (Poisson, or gamma with
--burstiness), streamed, timed chunk by chunk and checked for format. Each rate is a
separate run over a fresh workload (seed + run index, so prompts do not hit the prefix
cache of an earlier run); the same flags replay the same requests against any server.

Every request ends in exactly one of: completed, failed, lost. A run passes only when
every request completed; the command exits 1 otherwise.
"""

from __future__ import annotations

import argparse
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
    ClientSet,
    Endpoint,
    RequestRecord,
    ServerTarget,
    http_client,
    send_request,
    served_model,
)
from strata.bench.client_load import ClientLoad
from strata.bench.client_pool import ClientPool, send_all
from strata.bench.latency import SLO, Summary, summarize
from strata.bench.requests import DEFAULT_VOCAB_SIZE, PromptKind, bench_requests
from strata.bench.serve_report import format_report, report_title
from strata.bench.workload import parse_range
from strata.options import option


def parse_rate(text: str) -> float:
    """A --request-rate value: requests per second > 0, or inf."""
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or inf, got {text!r}") from None
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"a request rate must be > 0, got {text!r}")
    return rate


@dataclass(frozen=True)
class ServeBenchConfig:
    """A run of `strata bench serve`; each field is one of its flags."""

    url: str = field(metadata=option(
        "root URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000 (Strata or "
        "vLLM; without /v1)",
    ))  # fmt: skip
    num_requests: int = field(
        default=200, metadata=option("requests per request rate (default 200)")
    )
    request_rates: tuple[float, ...] = field(default=(math.inf,), metadata=option(
        "mean arrivals per second; inf sends all at once. Several values run one after "
        "another as a sweep, each on a fresh workload (default inf)",
        keyword="request_rate", metavar="R", parse=parse_rate,
    ))  # fmt: skip
    burstiness: float = field(default=1.0, metadata=option(
        "shape of the gamma-distributed gaps between arrivals (mean 1/R): 1 = Poisson, "
        "< 1 burstier (as in BurstGPT), > 1 more regular (default 1)",
        metavar="B",
    ))  # fmt: skip
    max_concurrency: int | None = field(default=None, metadata=option(
        "at most N requests in flight; later arrivals wait for a slot (default: no cap)",
        metavar="N",
    ))  # fmt: skip
    client_processes: int = field(default=1, metadata=option(
        "send and time the requests from N processes, each with its own event loop and "
        "HTTP client, request k from process k mod N; --max-concurrency is split over "
        "them. Use more when the report says the client lagged (default 1)",
        metavar="N",
    ))  # fmt: skip
    input_len: tuple[int, int] = field(default=(100, 1024), metadata=option(
        "prompt length in tokens, uniform in the range (default 100-1024)",
        metavar="LOW-HIGH", parse=parse_range,
    ))  # fmt: skip
    output_len: tuple[int, int] = field(default=(100, 1024), metadata=option(
        "output length in tokens, uniform; sent as max_tokens with ignore_eos, so it is "
        "exact (default 100-1024)",
        metavar="LOW-HIGH", parse=parse_range,
    ))  # fmt: skip
    endpoint: Endpoint = field(default="completions", metadata=option(
        "/v1/completions or /v1/chat/completions (default completions)"
    ))  # fmt: skip
    prompts: PromptKind | None = field(default=None, metadata=option(
        "random token ids (exact lengths; completions only) or text of common words "
        "(about one token per word; the server's usage gives the exact count). "
        "Default: token-ids for completions, text for chat",
    ))  # fmt: skip
    model: str | None = field(default=None, metadata=option(
        "model name sent in each request (default: the first model /v1/models lists)"
    ))  # fmt: skip
    api_key: str | None = field(default=None, metadata=option(
        "sent as 'Authorization: Bearer KEY' (default: none)"
    ))  # fmt: skip
    vocab_size: int = field(default=DEFAULT_VOCAB_SIZE, metadata=option(
        f"token ids are drawn from [100, V) (default {DEFAULT_VOCAB_SIZE}, valid for any "
        "model with at least that many tokens)",
        metavar="V",
    ))  # fmt: skip
    temperature: float = field(
        default=0.0, metadata=option("sampling temperature (default 0, greedy)")
    )
    seed: int = field(default=0, metadata=option("seed of the workload and arrivals (default 0)"))
    slo: SLO = field(default_factory=SLO)
    request_timeout_s: float = field(default=3600.0, metadata=option(
        "a request whose server stays silent this long is counted as lost (default 3600)",
        flag="--request-timeout", metavar="SECONDS",
    ))  # fmt: skip
    json_path: str | None = field(default=None, metadata=option(
        "write the config, the summary of each rate and every request's record as JSON",
        flag="--json", metavar="PATH",
    ))  # fmt: skip
    plot_path: str | None = field(default=None, metadata=option(
        "write a PNG: TTFT/TPOT histograms and latency per request for one rate; "
        "TTFT/TPOT p50/p99 and throughput against the rate for a sweep",
        flag="--plot", metavar="PATH.png",
    ))  # fmt: skip
    progress: bool = field(default=True, metadata=option("no progress bar", flag="--no-progress"))

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
        if self.client_processes < 1:
            raise ValueError(f"--client-processes must be >= 1, got {self.client_processes}")
        if self.max_concurrency is not None and self.max_concurrency < self.client_processes:
            raise ValueError(
                f"--max-concurrency {self.max_concurrency} is split over the client "
                f"processes: it must be >= --client-processes ({self.client_processes})"
            )
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
    client: ClientLoad

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
            "client": self.client.as_dict(),
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
    pool = None
    async with ClientSet(config.request_timeout_s) as clients:
        if config.client_processes > 1:
            pool = ClientPool(
                config.client_processes, target, config.max_concurrency,
                config.request_timeout_s,
            )  # fmt: skip
        try:
            runs = [
                await _run_rate(clients, pool, target, config, index, rate)
                for index, rate in enumerate(config.request_rates)
            ]
        finally:
            if pool is not None:
                pool.close()
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
    clients: ClientSet,
    pool: ClientPool | None,
    target: ServerTarget,
    config: ServeBenchConfig,
    index: int,
    rate: float,
) -> RateRun:
    """The run at the `index`-th rate, from this process or the pool's."""
    requests = bench_requests(
        config.num_requests, config.input_len, config.output_len, config.prompt_kind,
        config.seed + index, config.vocab_size,
    )  # fmt: skip
    offsets = arrival_offsets(len(requests), rate, config.burstiness, config.seed + index)
    desc = f"rate {rate_label(rate)} req/s"
    with tqdm(total=len(requests), desc=desc, disable=not config.progress) as bar:
        records, duration, load = await send_all(
            clients, pool, target, requests, offsets, config.max_concurrency,
            lambda done: bar.update(done - bar.n),
        )  # fmt: skip
    completed = [r.completed() for r in records if r.outcome == "ok"]
    failed = sum(r.outcome == "failed" for r in records)
    summary = summarize(completed, len(requests), failed, duration, config.slo)
    return RateRun(rate, summary, records, load)
