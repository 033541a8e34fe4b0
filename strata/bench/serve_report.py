"""The text report of `strata bench serve`: one block per request rate, and a table
over the rates of a sweep. Failed and lost requests are counted on the first line of each
block, flagged when not zero, and their reasons listed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from strata.bench.arrivals import rate_label
from strata.bench.latency import SLO, LatencyStats

if TYPE_CHECKING:
    from strata.bench.serve import RateRun, ServeBenchResult


def report_title(result: ServeBenchResult) -> str:
    c = result.config
    return (
        f"{result.model} at {c.url} ({c.endpoint}); {c.num_requests} requests per rate, "
        f"input {c.input_len[0]}-{c.input_len[1]}, output {c.output_len[0]}-{c.output_len[1]} "
        f"tokens, burstiness {c.burstiness:g}, max concurrency {c.max_concurrency or 'none'}, "
        f"seed {c.seed}"
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_run(run: RateRun, slo: SLO) -> str:
    s = run.summary
    lines = [
        f"---- request rate {rate_label(run.request_rate)} req/s ----",
        f"{'requests completed / failed / lost:':<36} {s.completed} / {s.failed} / {s.lost}"
        + ("" if run.passed else "   <-- NOT ALL REQUESTS COMPLETED"),
        f"{'duration (s):':<36} {s.duration_s:.2f}",
        f"{'request throughput (req/s):':<36} {s.request_throughput:.2f}",
        f"{'input token throughput (tok/s):':<36} {s.input_throughput:.1f}",
        f"{'output token throughput (tok/s):':<36} {s.output_throughput:.1f}",
        f"{'total input / output tokens:':<36} {s.input_tokens} / {s.output_tokens}",
        f"{'prefix-cached input tokens:':<36} {run.cached_tokens()}",
    ]
    if s.goodput is not None:
        named = (("TTFT", slo.ttft_ms), ("TPOT", slo.tpot_ms))
        objectives = ", ".join(f"{name} <= {ms:g} ms" for name, ms in named if ms is not None)
        lines.append(f"{'goodput (req/s):':<36} {s.goodput:.2f}  ({objectives})")
    mismatches = run.output_len_mismatches()
    if mismatches:
        lines.append(f"{'output length != max_tokens:':<36} {mismatches} requests")
    lines.append(f"{'latency (ms)':<12} {'mean':>10} {'p50':>10} {'p90':>10} {'p99':>10} {'n':>7}")
    for name, stats in (
        ("TTFT", s.ttft_ms),
        ("TPOT", s.tpot_ms),
        ("ITL", s.itl_ms),
        ("E2E", s.e2e_ms),
    ):
        lines.append(_stats_row(name, stats))
    for reason, count in run.failure_reasons().most_common(5):
        lines.append(f"  {count} x {reason}")
    lines.append(f"client: {run.client.describe()}")
    return "\n".join(lines)


def _stats_row(name: str, stats: LatencyStats) -> str:
    cells = (_ms(stats.mean), _ms(stats.p50), _ms(stats.p90), _ms(stats.p99))
    return f"{name:<12} " + " ".join(f"{c:>10}" for c in cells) + f" {stats.count:>7}"


def format_sweep(runs: list[RateRun]) -> str:
    lines = [
        f"{'rate':>6} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'TPOT p50':>9} {'TPOT p99':>9} {'failed':>7} {'lost':>5}"
    ]
    for run in runs:
        s = run.summary
        lines.append(
            f"{rate_label(run.request_rate):>6} {s.request_throughput:>7.2f} "
            f"{s.output_throughput:>10.1f} {_ms(s.ttft_ms.p50):>9} {_ms(s.ttft_ms.p99):>9} "
            f"{_ms(s.tpot_ms.p50):>9} {_ms(s.tpot_ms.p99):>9} {s.failed:>7} {s.lost:>5}"
        )
    return "\n".join(lines)


def format_report(result: ServeBenchResult) -> str:
    parts = [f"==== serving benchmark: {report_title(result)} ===="]
    parts += [format_run(run, result.config.slo) for run in result.runs]
    if len(result.runs) > 1:
        parts.append("---- sweep (latencies in ms) ----\n" + format_sweep(result.runs))
    total = sum(run.summary.failed + run.summary.lost for run in result.runs)
    parts.append("all requests completed" if result.passed else f"{total} requests FAILED or LOST")
    return "\n".join(parts)
