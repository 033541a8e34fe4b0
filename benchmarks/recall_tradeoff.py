"""The recall and eviction policies side by side: quality against budget, and the trade
of quality, speed and GPU memory in one table (issue 17).

    python benchmarks/recall_tradeoff.py --quality Q [Q ...] [--speed S.json ...] --out OUT
        [--kvpress L:BUDGET:SCORE:LABEL ...] [--keep RESULTS.json]

Q: folders holding `strata eval ruler` summaries (strata_ruler_*.json, searched below
them; gpu_recall_quality.sh writes one a run), such a folder packed as .tgz (as
gpu_recall_quality.sh packs OUT), or a RESULTS.json this script kept. S:
recall_speed.py --json outputs (their "decode" rows; with and without --prefetch).
--kvpress: a score measured with kvpress on the same samples, drawn as a star. Writes
OUT/recall_sweep_L<length>.png (score against budget: recall policies solid, evicting
ones dashed, query-agnostic hollow; the full cache at budget 1) and prints OUT/tradeoff.md:
each policy's score at every budget as a share of full, and, per policy, its score at
1/16, its decode tok/s, bytes fetched per token and GPU memory per sequence at the speed
runs' context. --keep writes the summaries (without per-sample answers) and speed rows.
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

RECALL = ("quest", "shadowkv", "shadowkv4", "clusterkv", "pqcache", "magicpig", "full_offload")


def summaries(folders: list[Path]) -> list[dict[str, Any]]:
    """Every ruler summary below `folders` (a setting found twice: the last one read, unless
    the two hold different tasks, as runs split one process a task do: then joined). A
    run folder named for a variant of its policy (shadowkv4_4096_0.0625: shadowkv with
    4-token landmarks) names the policy in the tables and plots."""
    found: dict[tuple[Any, ...], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as unpacked:
        for folder in folders:
            if folder.name.endswith(".tgz"):
                with tarfile.open(folder) as packed:
                    packed.extractall(Path(unpacked) / folder.name, filter="data")
                folder = Path(unpacked) / folder.name
            elif folder.is_file():  # kept by --keep: already named
                for s in json.loads(folder.read_text())["runs"]:
                    found[(s["length"], s["policy"], s["budget"], s["protocol"])] = s
                continue
            for path in sorted(folder.rglob("strata_ruler_*.json")):
                s = json.loads(path.read_text())
                s.pop("samples", None)
                s["policy"] = _variant(path, s["policy"])
                key = (s["length"], s["policy"], s["budget"], s["protocol"])
                found[key] = joined(found[key], s) if key in found else s
    return list(found.values())


def joined(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """One summary of a setting from two over disjoint tasks (run side by side: the wall
    time is the longer); b alone if they share a task (b replaces a)."""
    if set(a["tasks"]) & set(b["tasks"]):
        return b
    n = a["num_samples"] + b["num_samples"]
    tasks = {**a["tasks"], **b["tasks"]}
    per_sample = {k: (a[k] * a["num_samples"] + b[k] * b["num_samples"]) / n
                  for k in ("peak_kv_mib", "final_kv_mib")}  # fmt: skip
    average = sum(tasks.values()) / len(tasks)
    wall = max(a["wall_s"], b["wall_s"])
    return {**a, **per_sample, "tasks": tasks, "num_samples": n, "average": average,
            "wall_s": wall}  # fmt: skip


def _variant(path: Path, policy: str) -> str:
    for parent in path.parents:
        if (match := re.match(r"([a-z0-9]+)_\d+", parent.name)) is not None:
            name = match.group(1)
            return name if name.startswith(policy) else policy
    return policy


def quality_table(runs: list[dict[str, Any]]) -> list[str]:
    """Rows of length, policy, protocol: the average at each budget, % of full."""
    budgets = sorted({s["budget"] for s in runs if s["policy"] != "full"}, reverse=True)
    full = {s["length"]: s["average"] for s in runs if s["policy"] == "full"}
    cells: dict[tuple[int, str, str], dict[float, float]] = defaultdict(dict)
    for s in runs:
        if s["policy"] != "full":
            cells[(s["length"], s["policy"], s["protocol"])][s["budget"]] = s["average"]
    head = "| L | policy | protocol | " + " | ".join(f"{b:g}" for b in budgets) + " |"
    lines = [head, "|" + "---|" * (3 + len(budgets))]
    for (length, policy, protocol), scores in sorted(cells.items()):
        base = full.get(length)
        shown = [_score(scores.get(b), base) for b in budgets]
        lines.append(f"| {length} | {policy} | {protocol} | " + " | ".join(shown) + " |")
    for length, score in sorted(full.items()):
        lines.append(f"| {length} | full | - | {score:.1f} (100%) |")
    return lines


def _score(score: float | None, full: float | None) -> str:
    if score is None:
        return "-"
    return f"{score:.1f}" + (f" ({100 * score / full:.0f}%)" if full else "")


def trade_table(runs: list[dict[str, Any]], speed: list[dict[str, Any]]) -> list[str]:
    """Per recall policy: its score at 1/16 at each length, and per speed row its tok/s,
    MB fetched per token and GPU MB per sequence."""
    at16 = defaultdict(dict)
    for s in runs:
        if s["policy"] in RECALL and s["budget"] == 0.0625:
            at16[s["policy"]][s["length"]] = s["average"]
    lines = ["| policy | RULER at 1/16 | context | batch | prefetch | tok/s | MB fetched / token "
             "| GPU MB / sequence |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for policy in RECALL:
        quality = ", ".join(f"{v:.1f} ({k // 1024}k)" for k, v in sorted(at16[policy].items()))
        rows = [r for r in speed if r.get("mode") == policy and "tok_s" in r] or [{}]
        for r in rows:
            if not quality and not r:
                continue
            lines.append(
                f"| {policy} | {quality or '-'} | {r.get('context', '-')} | {r.get('batch', '-')} "
                f"| {r.get('prefetch', '-')} | {r.get('tok_s', float('nan')):.1f} "
                f"| {r.get('fetched_MB_per_token', float('nan')):.1f} "
                f"| {r.get('gpu_MB_per_sequence', float('nan')):.0f} |"
            )
    return lines


def decode_rows(result: Any) -> list[dict[str, Any]]:
    """The "decode" rows of a recall_speed.py result, also where it sits inside another
    result file (as in the results_recall_*.json kept in benchmarks/)."""
    if not isinstance(result, dict):
        return []
    rows = list(result.get("decode", []))
    return rows + [r for v in result.values() if isinstance(v, dict) for r in decode_rows(v)]


def plot(runs: list[dict[str, Any]], kvpress: list[tuple[float, float, str]], path: Path,
         title: str) -> None:  # fmt: skip
    """Score against budget (log scale), a line per policy and protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = next((s["average"] for s in runs if s["policy"] == "full"), None)
    lines: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for s in runs:
        if s["policy"] != "full":
            lines[(s["policy"], s["protocol"])].append((s["budget"], s["average"]))
    colours = plt.get_cmap("tab10")
    policies = sorted({policy for policy, _ in lines})
    fig, ax = plt.subplots(figsize=(8, 5))
    for (policy, protocol), points in sorted(lines.items()):
        points = sorted([*points, *([(1.0, full)] if full is not None else [])])
        recall = policy in RECALL
        ax.plot([b for b, _ in points], [v for _, v in points], "-" if recall else "--",
                color=colours(policies.index(policy) % 10), marker="o",
                markerfacecolor="none" if protocol == "query-agnostic" else None,
                label=f"{policy} ({protocol}{', recall' if recall else ''})")  # fmt: skip
    for budget, score, label in kvpress:
        ax.plot([budget], [score], "k*", markersize=12, label=f"kvpress {label}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV budget (fraction of the context attended)")
    ax.set_ylabel("RULER average score (full cache at 1)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def kvpress_points(specs: list[str]) -> dict[int, list[tuple[float, float, str]]]:
    """L:BUDGET:SCORE:LABEL specs, by length."""
    points: dict[int, list[tuple[float, float, str]]] = defaultdict(list)
    for spec in specs:
        length, budget, score, label = spec.split(":", 3)
        points[int(length)].append((float(budget), float(score), label))
    return points


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quality", type=Path, nargs="+", required=True,
                   help="folders with strata eval ruler summaries (searched below), or a "
                        "--keep file")
    p.add_argument("--speed", type=Path, nargs="*", default=[],
                   help="recall_speed.py --json outputs (their decode rows), or a --keep file")
    p.add_argument("--kvpress", nargs="*", default=[], metavar="L:BUDGET:SCORE:LABEL",
                   help="kvpress scores on the same samples, drawn as stars")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs and tradeoff.md")
    p.add_argument("--keep", type=Path, help="write the summaries and speed rows here")
    a = p.parse_args()
    runs = summaries(a.quality)
    speed = [r for path in a.speed for r in decode_rows(json.loads(path.read_text()))]
    stars = kvpress_points(a.kvpress)
    a.out.mkdir(parents=True, exist_ok=True)
    for length in sorted({s["length"] for s in runs}):
        mine = [s for s in runs if s["length"] == length]
        plot(mine, stars[length], a.out / f"recall_sweep_L{length}.png",
             f"RULER at {length} tokens, SmolLM2-135M")
    text = "\n".join([*quality_table(runs), "", *trade_table(runs, speed)]) + "\n"
    (a.out / "tradeoff.md").write_text(text)
    if a.keep is not None:
        kept = {"runs": runs, "kvpress": a.kvpress, "speed": {"decode": speed}}
        a.keep.write_text(json.dumps(kept, indent=1))
    print(text)


if __name__ == "__main__":
    main()
