"""Latency statistics of a serving run: mean and percentiles, throughput and goodput.

Percentiles interpolate linearly between the closest ranks (numpy's default), so the p50
of [1, 2, 3, 4] is 2.5. All latencies here are in milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from strata.options import option

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class LatencyStats:
    """Mean and p50/p90/p99 of a sample; all None when the sample is empty."""

    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> LatencyStats:
        if not values:
            return cls(0, None, None, None, None)
        arr = np.asarray(values, dtype=np.float64)
        p50, p90, p99 = (float(v) for v in np.percentile(arr, PERCENTILES))
        return cls(len(values), float(arr.mean()), p50, p90, p99)


@dataclass(frozen=True)
class SLO:
    """Service-level objectives; None = no objective on that latency."""

    ttft_ms: float | None = field(default=None, metadata=option(
        "time-to-first-token objective; with it (or --slo-tpot-ms) goodput is reported: "
        "completed requests per second that meet every objective",
        keyword="slo_ttft_ms", metavar="MS",
    ))  # fmt: skip
    tpot_ms: float | None = field(default=None, metadata=option(
        "time-per-output-token objective, for goodput", keyword="slo_tpot_ms", metavar="MS"
    ))  # fmt: skip

    @property
    def is_set(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None

    def met(self, ttft_ms: float, tpot_ms: float | None) -> bool:
        """A request with a single output token has no TPOT and meets any TPOT objective."""
        if self.ttft_ms is not None and ttft_ms > self.ttft_ms:
            return False
        return self.tpot_ms is None or tpot_ms is None or tpot_ms <= self.tpot_ms


@dataclass(frozen=True)
class CompletedRequest:
    """The measurements of one request that completed well formed."""

    ttft_ms: float
    tpot_ms: float | None
    itl_ms: tuple[float, ...]
    e2e_ms: float
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Summary:
    """What a run reports. `completed + failed + lost == num_requests` always."""

    num_requests: int
    completed: int
    failed: int
    lost: int
    duration_s: float
    input_tokens: int
    output_tokens: int
    request_throughput: float
    input_throughput: float
    output_throughput: float
    goodput: float | None
    ttft_ms: LatencyStats
    tpot_ms: LatencyStats
    itl_ms: LatencyStats
    e2e_ms: LatencyStats

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def tpot_ms(e2e_ms: float, ttft_ms: float, output_tokens: int) -> float | None:
    """Mean time per output token after the first; None with fewer than two tokens."""
    if output_tokens < 2:
        return None
    return (e2e_ms - ttft_ms) / (output_tokens - 1)


def summarize(
    completed: Sequence[CompletedRequest],
    num_requests: int,
    failed: int,
    duration_s: float,
    slo: SLO,
) -> Summary:
    """Throughputs are over `duration_s`, the wall time from the first send to the last
    answer. Goodput counts completed requests that meet every objective in `slo` (None
    when `slo` sets none)."""
    lost = num_requests - len(completed) - failed
    if lost < 0:
        raise ValueError(f"{len(completed)} completed + {failed} failed > {num_requests} sent")
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    input_tokens = sum(r.input_tokens for r in completed)
    output_tokens = sum(r.output_tokens for r in completed)
    good = sum(slo.met(r.ttft_ms, r.tpot_ms) for r in completed)
    return Summary(
        num_requests=num_requests,
        completed=len(completed),
        failed=failed,
        lost=lost,
        duration_s=duration_s,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        request_throughput=len(completed) * per_s,
        input_throughput=input_tokens * per_s,
        output_throughput=output_tokens * per_s,
        goodput=good * per_s if slo.is_set else None,
        ttft_ms=LatencyStats.of([r.ttft_ms for r in completed]),
        tpot_ms=LatencyStats.of([r.tpot_ms for r in completed if r.tpot_ms is not None]),
        itl_ms=LatencyStats.of([gap for r in completed for gap in r.itl_ms]),
        e2e_ms=LatencyStats.of([r.e2e_ms for r in completed]),
    )
