"""PNG plots of a serving benchmark (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after the backend is chosen

from strata.bench.arrivals import rate_label
from strata.bench.client import RequestRecord
from strata.bench.latency import Summary


def plot_run(records: Sequence[RequestRecord], path: str, title: str) -> None:
    """One rate: TTFT and TPOT histograms, and each request's TTFT and end-to-end latency
    against the time it was sent."""
    ok = [r for r in records if r.outcome == "ok"]
    fig, (ax_ttft, ax_tpot, ax_time) = plt.subplots(1, 3, figsize=(16, 4.5))
    ax_ttft.hist([r.ttft_ms for r in ok], bins=30, color="tab:blue")
    ax_ttft.set(xlabel="TTFT (ms)", ylabel="requests", title="time to first token")
    tpots = [r.tpot_ms for r in ok if r.tpot_ms is not None]
    ax_tpot.hist(tpots, bins=30, color="tab:orange")
    ax_tpot.set(xlabel="TPOT (ms)", ylabel="requests", title="time per output token")
    sent = [r.sent_s for r in ok]
    ax_time.scatter(sent, [r.e2e_ms for r in ok], s=8, label="end to end", color="tab:green")
    ax_time.scatter(sent, [r.ttft_ms for r in ok], s=8, label="TTFT", color="tab:blue")
    bad = [r for r in records if r.outcome != "ok"]
    if bad:
        ax_time.scatter(
            [r.sent_s for r in bad], [0.0] * len(bad), s=20, marker="x", color="tab:red",
            label=f"failed or lost ({len(bad)})",
        )  # fmt: skip
    ax_time.set(xlabel="sent at (s from start)", ylabel="ms", title="latency per request")
    ax_time.legend()
    _save(fig, path, title)


def plot_sweep(rates: Sequence[float], summaries: Sequence[Summary], path: str, title: str) -> None:
    """Several rates: TTFT and TPOT p50/p99, and output throughput, against the rate."""
    x = list(range(len(rates)))  # categorical axis, so that rate inf has a place
    labels = [rate_label(r) for r in rates]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, name, stats in (
        (axes[0], "TTFT", [s.ttft_ms for s in summaries]),
        (axes[1], "TPOT", [s.tpot_ms for s in summaries]),
    ):
        ax.plot(x, [_nan(s.p50) for s in stats], marker="o", label="p50")
        ax.plot(x, [_nan(s.p99) for s in stats], marker="o", label="p99")
        ax.set(xlabel="request rate (req/s)", ylabel="ms", title=f"{name} vs request rate")
        ax.set_xticks(x, labels)
        ax.legend()
    axes[2].plot(x, [s.output_throughput for s in summaries], marker="o", color="tab:green")
    axes[2].set(xlabel="request rate (req/s)", ylabel="tokens/s", title="output throughput")
    axes[2].set_xticks(x, labels)
    _save(fig, path, title)


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _save(fig: plt.Figure, path: str, title: str) -> None:
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
