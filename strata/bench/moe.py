"""Expert offloading benchmark: decode tok/s of MoE shapes with a fraction of the
experts resident on the GPU, against the link-bandwidth bound and a naive baseline.

For each model (random weights; optionally fewer layers of the real shape), batch size,
routing (the random routers, or a replayed trace with controlled locality) and residency
(the fraction of all experts that fit in the expert slots):

    ours    the expert cache (policy), cross-layer prefetch, CPU compute per cost model
    naive   copy every used expert on demand: no reuse, no prefetch, no CPU compute
    bound   tok/s <= batch * BW_h2d / ((1 - hit) * uses_per_step * expert_bytes)
            hit = cache hits / uses (prefetched and CPU-computed uses count as misses:
            their bytes crossed, or would have crossed, the link); uses_per_step = the
            (layer, expert) pairs a decode step needs, layers * top_k at batch 1;
            BW_h2d = pinned host-to-device bandwidth measured in the same run

    python -m strata.bench.moe --models olmoe-1b-7b:16 mixtral-8x7b:8 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from strata.bench.moe_trace import TraceRouting
from strata.config import CacheConfig, EngineConfig, MoEConfig, SchedulerConfig
from strata.engine.engine import LLMEngine
from strata.engine.sampling_params import SamplingParams
from strata.models.moe import MoeModel
from strata.models.presets import PRESETS
from strata.moe.offloaded_experts import OffloadOptions
from strata.moe.policies import make_policy

logger = logging.getLogger("strata.bench.moe")


@dataclass
class MoeRun:
    model: str
    layers: int
    batch: int
    routing: str  # "router" or "trace-0.8"
    residency: float
    slots: int
    mode: str  # "ours" or "naive"
    policy: str
    tok_s: float
    hit_rate: float  # uses served from a slot (prefetched included)
    cache_hit_rate: float  # uses resident before the step (the bound's hit)
    uses_per_step: float
    gb_moved_per_step: float
    bound_tok_s: float | None
    prefetch_precision: float
    prefetch_recall: float
    cpu_experts_per_step: float


def measure_h2d(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Pinned host-to-device bandwidth in bytes/s (median of `repeats` copies)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return nbytes / sorted(times[1:])[repeats // 2]


def shape_spec(preset: str, layers: int | None, max_positions: int) -> str:
    cfg = dict(PRESETS[preset], max_position_embeddings=max_positions)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    path = os.path.join(tempfile.mkdtemp(), f"{preset}-{layers}l.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return f"random:{path}"


def build_engine(spec: str, device: str, args: argparse.Namespace) -> LLMEngine:
    config = EngineConfig(
        model=spec,
        device=device,
        dtype=args.dtype,
        cache=CacheConfig(num_blocks=args.kv_blocks, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_batched_tokens=1024, max_model_len=args.max_model_len),
        moe=MoEConfig(
            expert_slots=1 << 30,  # capped at every expert: the arena holds 100% residency
            rebalance_interval=0,
            cpu_compute=args.cpu_compute,
            policy="lfru",
        ),
    )
    return LLMEngine(config)


def decode_run(engine: LLMEngine, batch: int, warmup: int, steps: int, seed: int) -> float:
    """Prefill `batch` random prompts, run `warmup` decode steps, then time `steps`.
    Returns seconds of the timed steps. Counters are snapshotted by the caller via the
    `on_timed` hook (engine.moe.experts.counters) just before the timed steps."""
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=warmup + steps + 4, temperature=0, ignore_eos=True)
    for i in range(batch):
        prompt = [rng.randrange(vocab) for _ in range(32)]
        engine.add_request(prompt, params, request_id=f"s{seed}-{i}")
    while any(s.num_output_tokens == 0 for s in engine.scheduler.running) or (
        engine.scheduler.waiting
    ):
        engine.step()
    for _ in range(warmup):
        engine.step()
    _snapshot.clear()
    _snapshot.update(_counters(engine))
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    seconds = time.perf_counter() - start
    for request_id in engine.request_ids():
        engine.abort(request_id)
    return seconds


_snapshot: dict[str, float] = {}


def _counters(engine: LLMEngine) -> dict[str, float]:
    assert engine.moe is not None
    return {**engine.moe.experts.counters.totals(), "bytes": engine.moe.cache.bytes_moved}


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def reset_cache(engine: LLMEngine, policy: str) -> None:
    """Empty the expert cache and give it a fresh policy (same slots)."""
    assert engine.moe is not None
    cache = engine.moe.cache
    capacity = cache.capacity
    cache.resize(0)
    cache.policy = make_policy(policy, engine.model_config.num_layers)
    cache.resize(capacity)


def one_run(
    engine: LLMEngine, label: dict[str, Any], batch: int, args: argparse.Namespace, bw: float
) -> MoeRun:
    seconds = decode_run(
        engine, batch, args.warmup, args.steps, seed=zlib.crc32(str(label).encode()) & 0xFFFF
    )
    after = _counters(engine)
    d = {k: after[k] - _snapshot[k] for k in after}
    assert engine.moe is not None
    store = engine.moe.cache.store
    uses = max(d["uses"], 1.0)
    cache_hit = d["hits"] / uses
    uses_per_step = d["uses"] / args.steps
    miss_bytes = (1 - cache_hit) * uses_per_step * store.expert_bytes
    bound = batch * bw / miss_bytes if miss_bytes > 0 else None
    return MoeRun(
        **label,
        batch=batch,
        slots=engine.moe.cache.capacity,
        tok_s=batch * args.steps / seconds,
        hit_rate=(d["hits"] + d["prefetch_hits"]) / uses,
        cache_hit_rate=cache_hit,
        uses_per_step=uses_per_step,
        gb_moved_per_step=d["bytes"] / args.steps / 1e9,
        bound_tok_s=bound,
        prefetch_precision=_ratio(d["correct"], d["predicted"]),
        prefetch_recall=_ratio(d["correct"], d["used_with_prediction"]),
        cpu_experts_per_step=d["cpu"] / args.steps,
    )


def profile_decode(engine: LLMEngine, batch: int, top: int = 15) -> str:
    """torch.profiler table of 3 decode steps at the current residency (host-side cost)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if engine.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        decode_run(engine, batch, warmup=0, steps=3, seed=99)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def run_model(preset: str, layers: int | None, args: argparse.Namespace, bw: float) -> list[MoeRun]:
    engine = build_engine(shape_spec(preset, layers, args.max_model_len), args.device, args)
    assert engine.moe is not None
    experts = engine.moe.experts
    ours = experts.options
    model = engine.loaded.model
    assert isinstance(model, MoeModel), "bench moe needs a MoE model"
    num_layers = engine.model_config.num_layers
    max_slots = engine.moe.max_slots
    runs: list[MoeRun] = []

    def run(label: dict[str, Any], batch: int) -> None:
        runs.append(
            one_run(engine, dict(model=preset, layers=num_layers, **label), batch, args, bw)
        )
        logger.info("%s", runs[-1])

    for routing in ["router", *(f"trace-{p}" for p in args.locality)]:
        options = ours
        if routing == "router":
            model.set_routed_experts(experts)
        else:  # the gate predicts the router, which the trace replaces: no prefetch
            locality = float(routing.split("-")[1])
            model.set_routed_experts(
                TraceRouting(experts, engine.model_config.num_experts, locality)
            )
            options = replace(ours, prefetch=False)
        for batch in args.batch:
            for residency in args.residency:
                engine.set_expert_slots(max(1, round(residency * max_slots)))
                for policy in args.policies if residency < 1 else ["lfru"]:
                    experts.options = options
                    reset_cache(engine, policy)
                    label = dict(routing=routing, residency=residency, mode="ours", policy=policy)
                    run(label, batch)
        engine.set_expert_slots(max(1, round(min(args.residency) * max_slots)))
        experts.options = OffloadOptions(prefetch=False, cpu_compute="off", naive=True)
        reset_cache(engine, "lru")
        for batch in args.batch:
            label = dict(routing=routing, residency=min(args.residency), mode="naive", policy="-")
            run(label, batch)
        experts.options = ours
    model.set_routed_experts(experts)
    if args.profile:
        engine.set_expert_slots(max_slots)
        print(f"profile: {preset}, 100% resident, batch 1\n{profile_decode(engine, 1)}")
    engine.check_integrity()
    return runs


def table(runs: list[MoeRun], bw: float) -> str:
    """Markdown: one row per (model, routing, batch, residency, policy) with naive beside."""
    naive = {(r.model, r.routing, r.batch): r.tok_s for r in runs if r.mode == "naive"}
    lines = [
        f"pinned H2D bandwidth (same run): {bw / 1e9:.1f} GB/s",
        "",
        "| model (layers) | routing | batch | residency | policy | tok/s | bound tok/s "
        "| % of bound | naive tok/s | x naive | hit rate | cache hit | GB moved/step "
        "| prefetch P/R | CPU experts/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        if r.mode != "ours":
            continue
        base = naive.get((r.model, r.routing, r.batch))
        bound = f"{r.bound_tok_s:.1f}" if r.bound_tok_s else "∞"
        pct = f"{100 * r.tok_s / r.bound_tok_s:.0f}%" if r.bound_tok_s else "-"
        speedup = f"{r.tok_s / base:.1f}x" if base else "-"
        lines.append(
            f"| {r.model} ({r.layers}) | {r.routing} | {r.batch} | {r.residency:.0%} "
            f"| {r.policy} | {r.tok_s:.1f} | {bound} | {pct} | {base or 0:.1f} | {speedup} "
            f"| {r.hit_rate:.0%} | {r.cache_hit_rate:.0%} | {r.gb_moved_per_step:.2f} "
            f"| {r.prefetch_precision:.0%}/{r.prefetch_recall:.0%} "
            f"| {r.cpu_experts_per_step:.1f} |"
        )
    return "\n".join(lines)


def plot(runs: list[MoeRun], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r.model, r.routing) for r in runs})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, (model, routing) in zip(axes[0], keys, strict=True):
        for batch in sorted({r.batch for r in runs}):
            sel = [r for r in runs if (r.model, r.routing, r.batch) == (model, routing, batch)]
            ours = sorted(
                (r for r in sel if r.mode == "ours" and r.policy == "lfru"),
                key=lambda r: r.residency,
            )
            if not ours:
                continue
            xs = [100 * r.residency for r in ours]
            (line,) = ax.plot(xs, [r.tok_s for r in ours], "o-", label=f"ours b{batch}")
            bounded = [(x, r.bound_tok_s) for x, r in zip(xs, ours, strict=True) if r.bound_tok_s]
            if bounded:
                ax.plot(*zip(*bounded, strict=True), "--", color=line.get_color(),
                        label=f"bound b{batch}")  # fmt: skip
            for r in sel:
                if r.mode == "naive":
                    ax.plot([100 * r.residency], [r.tok_s], "x", color=line.get_color(),
                            markersize=9, label=f"naive b{batch}")  # fmt: skip
        ax.set_yscale("log")
        ax.set_title(f"{model}, {routing}", fontsize=9)
        ax.set_xlabel("experts resident (%)")
        ax.set_ylabel("decode tok/s")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_args(p: argparse.ArgumentParser) -> None:
    from strata.config import ENGINE_OPTIONS
    from strata.flags import add_flags

    p.add_argument(
        "--models", nargs="+", default=["olmoe-1b-7b", "qwen3-30b-a3b:12", "mixtral-8x7b:8"],
        metavar="PRESET[:LAYERS]",
        help="MoE presets, each optionally with fewer layers of the real shape",
    )  # fmt: skip
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--residency", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    p.add_argument("--locality", type=float, nargs="*", default=[0.8],
                   help="replayed-trace locality values (0 = uniform)")  # fmt: skip
    p.add_argument("--policies", nargs="+", default=["lfru", "lru"])
    p.add_argument("--steps", type=int, default=12, help="timed decode steps per run")
    p.add_argument("--warmup", type=int, default=4, help="decode steps before timing")
    p.add_argument("--kv-blocks", type=int, default=256)
    engine = [o for o in ENGINE_OPTIONS if o.keyword in ("device", "dtype", "max_model_len")]
    helps = {"max_model_len": "longest sequence (default 256)"}
    add_flags(p, engine, {"max_model_len": 256}, helps)
    p.add_argument("--cpu-compute", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--profile", action="store_true", help="profile decode steps per model")
    p.add_argument("--json", default=None, help="write the runs as JSON")
    p.add_argument("--plot", default=None, help="write a PNG of tok/s against residency")
    p.add_argument("--from-json", default=None, help="print/plot a saved run instead")


def run(args: argparse.Namespace) -> None:
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        runs, bw = [MoeRun(**r) for r in saved["runs"]], saved["h2d_bytes_per_s"]
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        args.device = str(device)
        bw = measure_h2d(device)
        logger.info("pinned H2D bandwidth %.1f GB/s", bw / 1e9)
        runs = []
        for item in args.models:
            preset, _, layers = item.partition(":")
            start = time.perf_counter()
            runs.extend(run_model(preset, int(layers) if layers else None, args, bw))
            gc.collect()  # the engine (and its pinned experts) is gone: free them now
            if device.type == "cuda":
                torch.cuda.empty_cache()
            logger.info("%s done in %.0f s", item, time.perf_counter() - start)
            if args.json:  # after every model, so a cut-off run keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({"h2d_bytes_per_s": bw, "runs": [asdict(r) for r in runs]}, f)
    print(table(runs, bw))
    if args.plot:
        plot(runs, args.plot)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_args(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
