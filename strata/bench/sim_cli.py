"""`strata bench sim`: the replica simulator's sweep from the command line (strata/sim)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from strata.server.replicas.routers import ROUTERS

DEFAULT_COST = Path(__file__).parent.parent / "sim" / "fits" / "smollm2_cpu1.json"
# One 16-token block of SmolLM2-135M's KV in float32 (30 layers x K,V x 3 heads x 64 x 4 B)
# is 737,280 bytes: 74 us at 10 GB/s.
BLOCK_TRANSFER_S = 737_280 / 10e9

DESCRIPTION = """\
Simulate N engine replicas behind the real routers (kv-aware, least-loaded, round-robin)
and, optionally, a prefill/decode split, on a BurstGPT-shaped multi-turn chat workload;
each replica's step costs come from a fit of a real replica's measured steps (--cost,
made by benchmarks/sim_fit.py). The workload scales with N: sessions, arrival rate and
system prompts are given per replica. Prints one row per (replicas, router, P:D) with
TTFT mean/p50/p99, TPOT, end-to-end latency, prefix hit rate and replica busy fraction.
Validated against real 2-replica runs by benchmarks/sim_validate.py (docs/benchmarks.md).
"""


def _ratio(text: str) -> tuple[int, int]:
    p, _, d = text.partition(":")
    try:
        ratio = (int(p), int(d))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a P:D ratio looks like 1:3, got {text!r}") from None
    if min(ratio) < 1:
        raise argparse.ArgumentTypeError(f"both sides of a P:D ratio must be >= 1, got {text!r}")
    return ratio


def add_sim_args(p: argparse.ArgumentParser) -> None:
    _add_cluster_args(p.add_argument_group("cluster"))
    _add_workload_args(p.add_argument_group("workload (per replica)"))
    _add_output_args(p.add_argument_group("output"))


def _add_cluster_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--cost",
        default=str(DEFAULT_COST),
        help="step-cost fit JSON (default: the embedded model on one CPU core)",
    )
    g.add_argument(
        "--replicas",
        type=int,
        nargs="+",
        default=[8, 64, 512],
        metavar="N",
        help="replica counts to simulate (default 8 64 512)",
    )
    g.add_argument(
        "--routers",
        nargs="+",
        default=list(ROUTERS.names()),
        choices=ROUTERS.names(),
        help="routers compared with every replica prefilling and decoding",
    )
    g.add_argument(
        "--pd-ratios",
        type=_ratio,
        nargs="*",
        default=[(1, 1), (1, 3), (3, 1)],
        metavar="P:D",
        help="prefill:decode replica ratios to simulate (default 1:1 1:3 3:1; none to skip)",
    )
    g.add_argument(
        "--pd-router",
        default="kv-aware",
        choices=ROUTERS.names(),
        help="router over the prefill replicas of a split (decode: least-loaded)",
    )
    _add_replica_args(g)


def _add_replica_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--blocks-per-replica",
        type=int,
        default=512,
        help="KV blocks per replica (default 512: a few sessions' histories)",
    )
    g.add_argument("--block-size", type=int, default=16, help="tokens per block (default 16)")
    g.add_argument(
        "--max-batched-tokens",
        type=int,
        default=2048,
        help="per-step token budget of a replica (default 2048, as the engine)",
    )
    g.add_argument("--max-seqs", type=int, default=256, help="running sequences per replica")
    g.add_argument(
        "--request-overhead-s",
        type=float,
        default=0.0,
        help="seconds before a replica sees a request (HTTP, front; default 0)",
    )
    g.add_argument(
        "--transfer-base-s",
        type=float,
        default=0.001,
        help="fixed seconds of a prefill->decode KV handoff (default 0.001)",
    )
    g.add_argument(
        "--transfer-s-per-block",
        type=float,
        default=BLOCK_TRANSFER_S,
        help="seconds per KV block handed off (default: one float32 SmolLM2 "
        "block at 10 GB/s, 7.4e-05)",
    )


def _add_workload_args(w: argparse._ArgumentGroup) -> None:
    w.add_argument(
        "--sessions-per-replica", type=int, default=8, help="chat sessions per replica (default 8)"
    )
    w.add_argument(
        "--rate-per-replica",
        type=float,
        default=0.05,
        help="sessions starting per second per replica (default 0.05)",
    )
    w.add_argument("--turns", type=int, default=3, help="turns per session (default 3)")
    w.add_argument(
        "--systems-per-replica",
        type=int,
        default=1,
        help="distinct system prompts per replica (default 1)",
    )
    w.add_argument("--system-len", type=int, default=256, help="system prompt tokens (256)")
    w.add_argument(
        "--system-skew",
        type=float,
        default=1.0,
        help="system prompt popularity: rank k weighs 1/k**skew (default 1)",
    )
    w.add_argument(
        "--think-s",
        type=float,
        default=10.0,
        help="mean seconds between an answer and the next turn (default 10)",
    )
    w.add_argument(
        "--gamma-shape",
        type=float,
        default=0.5,
        help="Gamma shape of session inter-arrival gaps (BurstGPT: 0.5)",
    )
    w.add_argument(
        "--zipf-a",
        type=float,
        default=1.1,
        help="Zipf exponent of message and answer lengths (BurstGPT: 1.1)",
    )
    w.add_argument(
        "--max-len",
        type=int,
        default=1024,
        help="message and answer lengths stay below this (default 1024)",
    )


def _add_output_args(o: argparse._ArgumentGroup) -> None:
    o.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    o.add_argument("--json", default=None, help="write the rows and settings here")
    o.add_argument("--plot", default=None, help="write a PNG of TTFT and hit rate vs replicas")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_bench_sim(args: argparse.Namespace) -> int:
    from strata.sim.config import SimConfig
    from strata.sim.costs import StepCost
    from strata.sim.report import markdown_table, plot_sweep
    from strata.sim.sweep import run_sweep, sweep_points
    from strata.sim.workloads import BurstGPTShape, ChatWorkload

    cost = StepCost.load(args.cost)
    base = SimConfig(
        blocks_per_replica=args.blocks_per_replica, block_size=args.block_size,
        max_batched_tokens=args.max_batched_tokens, max_seqs=args.max_seqs,
        request_overhead_s=args.request_overhead_s, transfer_base_s=args.transfer_base_s,
        transfer_s_per_block=args.transfer_s_per_block,
    )  # fmt: skip
    per_replica = ChatWorkload(
        sessions=args.sessions_per_replica, rate=args.rate_per_replica, turns=args.turns,
        systems=args.systems_per_replica, system_len=args.system_len,
        system_skew=args.system_skew, think_s=args.think_s,
        shape=BurstGPTShape(args.gamma_shape, args.zipf_a, args.max_len),
    )  # fmt: skip
    points = sweep_points(args.replicas, args.routers, args.pd_ratios, args.pd_router)
    rows = run_sweep(points, base, cost, per_replica, args.seed, not args.no_progress)
    print(f"# step cost {args.cost}: {cost.note}")
    print(markdown_table(rows))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "func"}
        Path(args.json).write_text(json.dumps({"args": settings, "rows": rows}, indent=1) + "\n")
    if args.plot:
        plot_sweep(rows, args.plot, f"simulated replicas, {args.turns}-turn chat, "
                   f"{args.rate_per_replica:g} sessions/s per replica")  # fmt: skip
    return 0
