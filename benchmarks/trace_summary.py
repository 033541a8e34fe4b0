"""Where a profiled stretch of steps spends its time, from a torch.profiler Chrome trace.

    python benchmarks/trace_summary.py TRACE.json[.gz] [--top 25]

Prints the span from the first to the last GPU event, the time at least one kernel or
copy runs (the union over streams), the idle gaps between them, and the kernels and copies
by total time. A span much longer than the busy time means the host, not the GPU, sets
the pace (launches, Python, syncs).
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter
from typing import Any

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def load(path: str) -> list[dict[str, Any]]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X"]


def busy_time(intervals: list[tuple[float, float]]) -> tuple[float, list[float]]:
    """(µs covered by the union of [start, end) intervals, the gaps between them)."""
    covered, gaps = 0.0, []
    end = None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            if end is not None:
                gaps.append(start - end)
            covered += stop - start
            end = stop
        elif stop > end:
            covered += stop - end
            end = stop
    return covered, gaps


def summarize(events: list[dict[str, Any]], top: int) -> None:
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    if not gpu:
        print("no GPU events in the trace")
        return
    spans = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in gpu]
    first, last = min(s for s, _ in spans), max(t for _, t in spans)
    busy, gaps = busy_time(spans)
    wall = last - first
    print(f"GPU span {wall / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms ({busy / wall:.0%}), "
          f"{len(gpu)} kernels and copies on {len({e['args'].get('stream') for e in gpu})} streams")
    big = sorted(gaps, reverse=True)
    print(f"idle gaps: {len(gaps)}, total {sum(gaps) / 1e3:.2f} ms; largest (ms): "
          + ", ".join(f"{g / 1e3:.2f}" for g in big[:10]))
    totals: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for e in gpu:
        totals[e["name"][:90]] += float(e["dur"])
        counts[e["name"][:90]] += 1
    print(f"{'total ms':>9} {'calls':>6} {'avg us':>8}  kernel")
    for name, total in totals.most_common(top):
        print(f"{total / 1e3:9.2f} {counts[name]:6d} {total / counts[name]:8.1f}  {name}")
    runtime = [e for e in events if e.get("cat") == "cuda_runtime"]
    launches = Counter(e["name"] for e in runtime)
    print("host CUDA API calls: " + ", ".join(f"{n} {c}" for n, c in launches.most_common(6)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace", help="a Chrome trace from torch.profiler (.json or .json.gz)")
    p.add_argument("--top", type=int, default=25, help="kernels to list")
    a = p.parse_args()
    summarize(load(a.trace), a.top)


if __name__ == "__main__":
    main()
