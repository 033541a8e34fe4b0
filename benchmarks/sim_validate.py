"""The simulator against real replica runs (issue 24): predicted and measured TTFT.

    python benchmarks/sim_validate.py RUN.json [RUN.json ...] [--cost FIT.json] [--out OUT.json]

RUN.json is what `benchmarks/replicas_routing.py --probes N --json RUN.json` wrote. For
each run this rebuilds its workload (the same system prompts x users in the same seeded
order, tokenized by the embedded model's chat template: real block keys), sizes each
simulated replica's cache as the run's `--kv-cache-memory` sized the engine's pool, and
simulates every router of the run with the same closed-loop concurrency. The per-request
cost outside engine steps (HTTP, front, Ray, tokenizing) is the run's own probe TTFT (short
requests sent alone before the load) less the fitted prefill of the probe prompt; nothing
is fitted to the TTFTs being predicted.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

from strata import LLM
from strata.sim.cluster import Simulator
from strata.sim.config import SimConfig
from strata.sim.costs import StepCost, StepWork, chunk_pairs
from strata.sim.workloads import shared_prefix_requests

sys.path.insert(0, str(Path(__file__).parent))
from replicas_routing import workload  # the real benchmark's own workload


def pool_flags(server_args: str) -> dict[str, float]:
    words = shlex.split(server_args)
    flags = {}
    for name in ("--kv-cache-memory", "--max-model-len"):
        if name in words:
            flags[name.strip("-").replace("-", "_")] = float(words[words.index(name) + 1])
    return flags


def validate(path: str, cost: StepCost) -> list[dict]:
    run = json.loads(Path(path).read_text())
    args = run["args"]
    flags = pool_flags(args["server_args"])
    llm = LLM(kv_cache_memory=flags.get("kv_cache_memory", 2.0),
              **({"max_model_len": int(flags["max_model_len"])} if "max_model_len" in flags
                 else {}))  # fmt: skip
    blocks = int(llm.stats()["kv_blocks_total"])
    block_size = llm.engine.kv.block_size
    conversations = workload(args["systems"], args["users"], args["seed"])
    prompts = [llm.chat_prompt_ids(m) for m in conversations]
    probe_ids = llm.chat_prompt_ids([{"role": "user", "content": "Hi 0"}])
    n = len(probe_ids)
    probe_prefill = cost.seconds(StepWork(n, 1, chunk_pairs(0, n), 0))
    rows = []
    for router, real in run["results"].items():
        probes = real.get("probe_ttfts_s") or [probe_prefill]  # no probes: no overhead
        overhead = max(0.0, statistics.mean(probes) - probe_prefill)
        config = SimConfig(
            replicas=args["replicas"], router=router, blocks_per_replica=blocks,
            block_size=block_size, request_overhead_s=overhead, concurrency=args["concurrency"],
        )  # fmt: skip
        requests = shared_prefix_requests(prompts, args["max_tokens"], block_size)
        result = Simulator(config, cost).run(requests)
        sim_ttft = statistics.mean(s.ttft_s for s in result.seqs)
        hit = sum(s.cached_tokens for s in result.seqs) / sum(s.prompt_len for s in result.seqs)
        split = [sum(1 for s in result.seqs if s.replica == r) for r in range(args["replicas"])]
        rows.append({
            "run": Path(path).name, "router": router, "blocks": blocks,
            "measured_ttft_s": real["ttft_mean_s"], "predicted_ttft_s": sim_ttft,
            "error": sim_ttft / real["ttft_mean_s"] - 1, "measured_hit": real["hit_rate"],
            "predicted_hit": hit, "overhead_s": overhead,
            "measured_split": list(real["per_replica"].values()), "predicted_split": split,
        })  # fmt: skip
    return rows


def plot(rows: list[dict], path: str) -> None:
    """Measured and predicted mean TTFT side by side, one pair of bars per (run, router)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['run'].removesuffix('.json').split('_')[-1]}\n{r['router']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(rows)), 4.5))
    ax.bar([i - 0.2 for i in x], [r["measured_ttft_s"] for r in rows], 0.4, label="measured")
    ax.bar([i + 0.2 for i in x], [r["predicted_ttft_s"] for r in rows], 0.4, label="simulated")
    for i, r in enumerate(rows):
        ax.annotate(f"{r['error']:+.0%}", (i + 0.2, r["predicted_ttft_s"]), ha="center",
                    va="bottom", fontsize=8)  # fmt: skip
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set(ylabel="mean TTFT (s)", title="2 real replicas (CPU) against the simulator")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="JSON files of benchmarks/replicas_routing.py --json")
    p.add_argument("--cost", default="strata/sim/fits/smollm2_cpu1.json")
    p.add_argument("--out", default=None, help="also write the rows here as JSON")
    p.add_argument("--plot", default=None, help="PNG of measured and predicted TTFT")
    args = p.parse_args()
    cost = StepCost.load(args.cost)
    rows = [row for path in args.runs for row in validate(path, cost)]
    print(f"# step cost: {args.cost} ({cost.note})")
    print(
        "| run | router | pool blocks | overhead (s) | TTFT measured (s) | TTFT predicted (s) "
        "| error | hit measured | hit predicted | split measured | split predicted |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['router']} | {r['blocks']} | {r['overhead_s']:.3f} | "
              f"{r['measured_ttft_s']:.3f} | {r['predicted_ttft_s']:.3f} | {r['error']:+.0%} | "
              f"{r['measured_hit']:.3f} | {r['predicted_hit']:.3f} | "
              f"{'/'.join(map(str, r['measured_split']))} | "
              f"{'/'.join(map(str, r['predicted_split']))} |")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
