"""PNG of Strata beside vLLM from a results file of benchmarks/gpu_overlap.sh and
vllm_side_by_side.py runs on one machine (benchmarks/results_overlap_h100_*.json):
offline throughput (Strata with overlap scheduling off and on, vLLM), and serving
throughput, TTFT and TPOT per request rate.

    python benchmarks/plot_side_by_side.py benchmarks/results_overlap_h100_2026-12-06.json \\
        docs/img/vllm_side_by_side_h100_2026-12-06.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after the backend is chosen

OFFLINE = ("offline-1b", "offline-8b")


def offline_bars(results: dict[str, Any]) -> dict[str, list[float]]:
    """Output tok/s per offline section for each engine configuration."""
    groups = {
        "Strata, overlap off": results["offline_overlap_off"]["groups"],
        "Strata, overlap on": results["offline_overlap_on"]["groups"],
    }
    bars = {
        name: [g[s]["strata"][s]["output_tok_s"] for s in OFFLINE] for name, g in groups.items()
    }
    vllm = results["offline_vllm_beside_overlap_on"]["groups"]
    bars["vLLM 0.26.0"] = [vllm[s]["vllm"][s]["output_tok_s"] for s in OFFLINE]
    return bars


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path)
    p.add_argument("png", type=Path)
    a = p.parse_args()
    results = json.loads(a.results.read_text())
    serve = results["serve_side_by_side"]["groups"]["serve"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    ax = axes[0]
    width = 0.27
    for i, (name, values) in enumerate(offline_bars(results).items()):
        xs = [x + (i - 1) * width for x in range(len(OFFLINE))]
        ax.bar(xs, values, width, label=name)
        for x, v in zip(xs, values, strict=True):
            ax.annotate(f"{v:,.0f}", (x, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(OFFLINE)), ["Llama-3.2-1B shape", "Llama-3-8B shape"])
    ax.set(ylabel="output tokens/s", title="offline, 256 requests, in/out 100-1024")
    ax.legend(fontsize=8)
    rates = [r["rate"] for r in serve["strata"]["serve"]]
    for ax, (key, label) in zip(
        axes[1:],
        [("output_tok_s", "output tokens/s"), ("ttft_p50_ms", "TTFT (ms)"),
         ("tpot_p50_ms", "TPOT (ms)")],
        strict=True,
    ):  # fmt: skip
        for engine in ("strata", "vllm"):
            values = [r[key] for r in serve[engine]["serve"]]
            name = "Strata" if engine == "strata" else "vLLM"
            suffix = "" if key == "output_tok_s" else " p50"
            ax.plot(rates, values, marker="o", label=name + suffix)
        if key != "output_tok_s":
            p99 = key.replace("p50", "p99")
            for engine, name, style in (("strata", "Strata", "C0--"), ("vllm", "vLLM", "C1--")):
                values = [r[p99] for r in serve[engine]["serve"]]
                ax.plot(rates, values, style, marker="x", label=f"{name} p99")
            ax.set_yscale("log")
        ax.set(xlabel="request rate (req/s)", ylabel=label, title=f"serving 1B: {label}")
        ax.legend(fontsize=8)
    gpu = results["gpu"].splitlines()[-1].split(",")[0]
    fig.suptitle(f"Strata beside vLLM 0.26.0, {gpu}, random weights, bf16 ({results['date']})")
    fig.tight_layout()
    a.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.png, dpi=110)
    print(f"wrote {a.png}")


if __name__ == "__main__":
    main()
