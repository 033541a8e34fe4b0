"""Summaries of runs: per-task scores (x100, as RULER reports), JSON, a table and a plot."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from strata.eval.strata_runner import RunResult

MIB = 1 << 20


def summarize(run: RunResult, length: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One run as a JSON-ready dict: setting, per-task and average score, time, KV use."""
    by_task: dict[str, list[float]] = defaultdict(list)
    for s in run.samples:
        by_task[s.task].append(s.score)
    tasks = {t: 100.0 * sum(v) / len(v) for t, v in by_task.items()}
    n = len(run.samples)
    return {
        "system": "strata",
        "length": length,
        "policy": "full" if run.setting.is_full else run.setting.policy,
        "budget": 1.0 if run.setting.is_full else run.setting.budget,
        "protocol": run.setting.protocol,
        "num_samples": n,
        "tasks": tasks,
        "average": sum(tasks.values()) / len(tasks),
        "wall_s": run.wall_s,
        "peak_kv_mib": sum(s.peak_kv_bytes for s in run.samples) / n / MIB,
        "final_kv_mib": sum(s.final_kv_bytes for s in run.samples) / n / MIB,
        **(extra or {}),
        "samples": [asdict(s) for s in run.samples],
    }


def write_json(summary: dict[str, Any], out_dir: Path) -> Path:
    dtype = summary.get("kv_cache_dtype", "auto")
    tier = summary.get("kv_tier_codec", "none") if summary.get("prefix_from") == "tier" else None
    name = (
        f"{summary['system']}_ruler_L{summary['length']}_{summary['policy']}_"
        f"b{summary['budget']:g}_{summary['protocol']}{'' if dtype == 'auto' else '_' + dtype}"
        f"{'' if tier is None else '_tier-' + tier}.json"
    )
    path = out_dir / name
    path.write_text(json.dumps(summary, indent=1))
    return path


def table(summaries: list[dict[str, Any]]) -> str:
    """A markdown table: one row per run, one column per task, then average, time, KV."""
    if not summaries:
        return ""
    tasks = list(dict.fromkeys(t for s in summaries for t in s["tasks"]))
    head = ["system", "L", "policy", "budget", "protocol", "KV dtype", *tasks, "avg", "wall s",
            "peak KV MiB", "final KV MiB"]  # fmt: skip
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        cells = [s["system"], str(s["length"]), s["policy"], f"{s['budget']:g}", s["protocol"],
                 s.get("kv_cache_dtype", "auto")]  # fmt: skip
        cells += [f"{s['tasks'][t]:.1f}" if t in s["tasks"] else "" for t in tasks]
        cells += [f"{s['average']:.1f}", f"{s['wall_s']:.1f}", f"{s['peak_kv_mib']:.2f}",
                  f"{s['final_kv_mib']:.2f}"]  # fmt: skip
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_sweep(summaries: list[dict[str, Any]], path: Path, title: str) -> None:
    """Average score against budget (log scale), one line per system/policy/protocol/length;
    the full cache is drawn at budget 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[tuple[str, str, str, int], list[tuple[float, float]]] = defaultdict(list)
    full = {(s["system"], s["length"]): s["average"] for s in summaries if s["policy"] == "full"}
    for s in summaries:
        if s["policy"] != "full":
            key = (s["system"], s["policy"], s["protocol"], s["length"])
            lines[key].append((s["budget"], s["average"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (system, policy, protocol, length), points in sorted(lines.items()):
        if (system, length) in full:
            points = [*points, (1.0, full[(system, length)])]
        points.sort()
        style = "-" if system == "strata" else "--"
        label = f"{system} {policy} ({protocol}, {length // 1024}k)"
        ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV budget (fraction of the context kept)")
    ax.set_ylabel("RULER average score")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
