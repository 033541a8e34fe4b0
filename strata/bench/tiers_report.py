"""The report of `strata bench tiers`: TTFT per source and context length, fetch
bandwidth against pinned host-to-device bandwidth, the chat table, JSON and a PNG plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from strata.bench.tiers_chat import ChatResult
from strata.bench.tiers_qa import SOURCES, QAMeasure

GB = 1e9


def ttft_table(measures: Sequence[QAMeasure]) -> dict[str, dict[int, float]]:
    """source -> context length -> mean TTFT (ms) over its documents (and questions)."""
    out: dict[str, dict[int, float]] = {}
    for source in SOURCES:
        rows = [m for m in measures if m.source == source]
        for length in sorted({m.length for m in rows}):
            out.setdefault(source, {})[length] = float(
                np.mean([m.ttft_ms for m in rows if m.length == length])
            )
    return out


def fetch_rows(
    measures: Sequence[QAMeasure], block_bytes_per_token: int, pinned_bytes_per_s: float | None
) -> list[dict[str, Any]]:
    """Per tier source and length: bytes loaded, the tiers' own read rates (stats), and the
    effective rate (loaded bytes / (TTFT - TTFT with the context in the GPU pool))."""
    gpu = ttft_table(measures).get("gpu", {})
    rows = []
    for source in SOURCES[2:]:
        for length in sorted({m.length for m in measures if m.source == source}):
            ms = [m for m in measures if m.source == source and m.length == length]
            loaded = float(np.mean([m.counters["tier_hit_tokens"] for m in ms]))
            nbytes = loaded * block_bytes_per_token
            row: dict[str, Any] = {
                "source": source,
                "length": length,
                "loaded_tokens": loaded,
                "loaded_gib": nbytes / 2**30,
            }
            for tier in ("cpu", "disk", "remote"):
                read = sum(m.counters[f"{tier}_bytes_read"] for m in ms)
                secs = sum(m.counters[f"{tier}_read_seconds"] for m in ms)
                row[f"{tier}_read_gbps"] = read / secs / GB if secs > 0 else None
            extra_ms = float(np.mean([m.ttft_ms for m in ms])) - gpu.get(length, math.nan)
            row["effective_gbps"] = nbytes / (extra_ms / 1e3) / GB if extra_ms > 0 else None
            if pinned_bytes_per_s:
                pinned = pinned_bytes_per_s / GB
                row["h2d_vs_pinned"] = _ratio(row["cpu_read_gbps"], pinned)
                row["effective_vs_pinned"] = _ratio(row["effective_gbps"], pinned)
            row["matches_recompute"] = all(m.matches_recompute is not False for m in ms)
            rows.append(row)
    return rows


def _ratio(value: float | None, ref: float) -> float | None:
    return None if value is None else value / ref


def _fmt(value: float | None, spec: str) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def format_qa(
    measures: Sequence[QAMeasure], fetch: list[dict[str, Any]], pinned_bytes_per_s: float | None
) -> str:
    table = ttft_table(measures)
    lengths = sorted({m.length for m in measures})
    lines = [
        "TTFT (ms), mean over documents; x = speedup over recompute",
        f"{'source':<11}" + "".join(f"{n:>18}" for n in lengths),
    ]
    recompute = table.get("recompute", {})
    for source, by_len in table.items():
        cells = []
        for n in lengths:
            ms = by_len.get(n)
            speed = recompute.get(n, math.nan) / ms if ms else None
            cells.append(f"{_fmt(ms, '.1f'):>10} {_fmt(speed, '.1f'):>6}x")
        lines.append(f"{source:<11}" + "".join(f"{c:>18}" for c in cells))
    pinned = _fmt(pinned_bytes_per_s and pinned_bytes_per_s / GB, ".1f")
    lines += [
        "",
        f"fetch bandwidth (GB/s); pinned host-to-device measured in this run: {pinned}",
        f"{'source':<11}{'length':>7}{'GiB':>7}{'cpu->gpu':>9}{'disk rd':>8}{'remote rd':>10}"
        f"{'effective':>10}{'h2d/pin':>8}{'eff/pin':>8}{'same':>6}",
    ]
    for r in fetch:
        lines.append(
            f"{r['source']:<11}{r['length']:>7}{r['loaded_gib']:>7.2f}"
            f"{_fmt(r['cpu_read_gbps'], '.1f'):>9}{_fmt(r['disk_read_gbps'], '.2f'):>8}"
            f"{_fmt(r['remote_read_gbps'], '.2f'):>10}{_fmt(r['effective_gbps'], '.2f'):>10}"
            f"{_fmt(r.get('h2d_vs_pinned'), '.0%'):>8}"
            f"{_fmt(r.get('effective_vs_pinned'), '.0%'):>8}"
            f"{'yes' if r['matches_recompute'] else 'NO':>6}"
        )
    return "\n".join(lines)


def format_chat(results: Sequence[ChatResult], mismatches: dict[str, int]) -> str:
    lines = [
        "multi-round chat: TTFT (ms) over all turns; tier hit tokens = prompt tokens "
        "loaded from a tier",
        f"{'mode':<14}{'mean':>9}{'p50':>9}{'p90':>9}{'total s':>9}{'gpu hit tok':>12}"
        f"{'tier hit tok':>13}{'preempt':>8}{'answers':>9}",
    ]
    for r in results:
        o = r.overall()
        same = (
            "ref"
            if r.mode not in mismatches
            else ("same" if mismatches[r.mode] == 0 else f"{mismatches[r.mode]} diff")
        )
        lines.append(
            f"{r.mode:<14}{o['mean_ms']:>9.1f}{o['p50_ms']:>9.1f}{o['p90_ms']:>9.1f}"
            f"{r.total_s:>9.2f}{r.stats.get('prefix_cache_hit_tokens', 0):>12}"
            f"{r.stats.get('prefix_cache_tier_hit_tokens', 0):>13}"
            f"{r.stats.get('num_preemptions', 0):>8}{same:>9}"
        )
    lines += [
        "",
        "mean TTFT (ms) per turn",
        f"{'mode':<14}" + "".join(f"{'t' + str(t + 1):>8}" for t in range(len(results[0].ttft_ms))),
    ]
    for r in results:
        lines.append(f"{r.mode:<14}" + "".join(f"{t['mean_ms']:>8.1f}" for t in r.turn_summary()))
    return "\n".join(lines)


def plot(measures: Sequence[QAMeasure], chats: Sequence[ChatResult], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if chats else 1, figsize=(14 if chats else 7, 4.8))
    ax = axes[0] if chats else axes
    for source, by_len in ttft_table(measures).items():
        xs = sorted(by_len)
        ax.plot(xs, [by_len[x] for x in xs], marker="o", label=source)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="context length (tokens)",
        ylabel="TTFT (ms)",
        title="long-document QA: TTFT by where the context comes from",
    )
    lengths = sorted({m.length for m in measures})
    ax.minorticks_off()
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.legend()
    if chats:
        for r in chats:
            turns = r.turn_summary()
            axes[1].plot(
                [t["turn"] for t in turns], [t["mean_ms"] for t in turns], marker="o", label=r.mode
            )
        axes[1].set_xticks([t["turn"] for t in chats[0].turn_summary()])
        axes[1].set(
            xlabel="turn",
            ylabel="mean TTFT (ms)",
            yscale="log",
            title="multi-round chat: mean TTFT per turn",
        )
        axes[1].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
