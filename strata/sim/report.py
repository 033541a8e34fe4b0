"""Summaries of simulated runs: per-run numbers, a markdown table and PNG plots."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from strata.sim.cluster import SimResult

COLUMNS = (
    ("replicas", "replicas", "{}"), ("router", "router", "{}"), ("pd", "P:D", "{}"),
    ("requests", "requests", "{}"), ("ttft_mean_s", "TTFT mean (s)", "{:.3f}"),
    ("ttft_p50_s", "TTFT p50 (s)", "{:.3f}"), ("ttft_p99_s", "TTFT p99 (s)", "{:.3f}"),
    ("tpot_mean_s", "TPOT mean (s)", "{:.3f}"), ("e2e_mean_s", "e2e mean (s)", "{:.2f}"),
    ("hit_rate", "hit rate", "{:.3f}"), ("busy", "busy", "{:.2f}"),
    ("req_per_s", "req/s", "{:.1f}"),
)  # fmt: skip


def summarize(result: SimResult) -> dict[str, Any]:
    seqs = result.seqs
    ttft = np.array([s.ttft_s for s in seqs])
    e2e = np.array([s.e2e_s for s in seqs])
    tpot = [t for t in (s.tpot_s for s in seqs) if t is not None]
    config = result.config
    return {
        "replicas": config.replicas, "router": config.router, "pd": config.pd_label,
        "requests": len(seqs), "ttft_mean_s": float(ttft.mean()),
        "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
        "tpot_mean_s": float(np.mean(tpot)) if tpot else 0.0, "e2e_mean_s": float(e2e.mean()),
        "hit_rate": sum(s.cached_tokens for s in seqs) / sum(s.prompt_len for s in seqs),
        "busy": sum(result.busy_s) / (len(result.busy_s) * result.end_s),
        "req_per_s": len(seqs) / result.end_s,
    }  # fmt: skip


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]  # fmt: skip
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[k]) for k, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def plot_sweep(rows: Sequence[dict[str, Any]], path: str, title: str) -> None:
    """TTFT mean and p99, and prefix hit rate, against the replica count: one line per
    router (colocated) and per P:D ratio (disaggregated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    lines: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        label = row["router"]
        if row["pd"] != "colocated":
            label += f" P:D {row['pd_ratio']}"
        lines.setdefault(label, []).append(row)
    for label, points in lines.items():
        points.sort(key=lambda r: r["replicas"])
        x = [r["replicas"] for r in points]
        style = "-o" if points[0]["pd"] == "colocated" else "--s"
        axes[0].plot(x, [r["ttft_mean_s"] for r in points], style, label=label)
        axes[1].plot(x, [r["ttft_p99_s"] for r in points], style, label=label)
        axes[2].plot(x, [r["hit_rate"] for r in points], style, label=label)
    for ax, name in zip(axes, ("TTFT mean (s)", "TTFT p99 (s)", "prefix hit rate"), strict=True):
        ax.set(xscale="log", xlabel="replicas", ylabel=name, title=name)
        ax.set_xticks(sorted({r["replicas"] for r in rows}), [str(n) for n in
                      sorted({r["replicas"] for r in rows})])  # fmt: skip
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[2].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
