"""The recall store on the GPU: zero-copy row fetches, and decode speed at long contexts.

uva     copy_rows (strata/ops/triton_row_copy.py) from pinned host rows into the GPU and
        back: exact, and its GB/s against a pinned host-to-device memcpy in the same run
decode  Llama-3-8B shape, random weights, bf16: decode tok/s of --batch requests at
        each context, for full attention in the GPU pool, full_offload, and quest and
        shadowkv at a budget of 2048 tokens; bytes fetched per token, and the fetch rate
        as a share of a pinned H2D memcpy measured in the same process
beyond  --beyond SEQSxCONTEXT:POLICY: sequences whose KV is many times the GPU pool, all
        completing

python benchmarks/recall_speed.py [--only uva,decode] [--contexts 32768,65536,131072]
                                  [--batch 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from strata import LLM, SamplingParams
from strata.bench.moe import shape_spec

sys.path.insert(0, str(Path(__file__).parent))
from recall_switches import ARMS, COMBINED, engine_default, set_arm

RESULTS: dict[str, Any] = {}
ROW = 16 * 128  # one block of one head: 16 tokens x 128 dims


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def timed(fn: Any, repeat: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def bench_uva() -> None:
    from strata.ops.triton_row_copy import copy_rows

    rows = 1 << 16  # 256 MiB of bf16 rows
    host = torch.randn(rows, ROW, dtype=torch.bfloat16).pin_memory()
    dev = torch.empty(rows // 4, ROW, dtype=torch.bfloat16, device="cuda")
    pick = torch.randperm(rows, device="cuda")[: rows // 4]
    dst = torch.arange(rows // 4, device="cuda")
    copy_rows(host, dev, pick, dst)
    exact = torch.equal(dev.cpu(), host[pick.cpu()])
    back = torch.zeros_like(host).pin_memory()
    copy_rows(dev, back, dst, pick)
    torch.cuda.synchronize()
    exact_back = torch.equal(back[pick.cpu()], dev.cpu())
    nbytes = dev.numel() * dev.element_size()
    t_gather = timed(lambda: copy_rows(host, dev, pick, dst))
    t_scatter = timed(lambda: copy_rows(dev, back, dst, pick))
    contiguous = host[: rows // 4]
    t_memcpy = timed(lambda: dev.copy_(contiguous, non_blocking=True))
    RESULTS["uva"] = {
        "exact_gather": exact, "exact_scatter": exact_back,
        "gather_GBps": gbps(nbytes, t_gather), "scatter_GBps": gbps(nbytes, t_scatter),
        "pinned_h2d_memcpy_GBps": gbps(nbytes, t_memcpy),
    }  # fmt: skip
    print("uva", RESULTS["uva"], flush=True)


def pinned_h2d_gbps() -> float:
    """A pinned host-to-device memcpy of 256 MiB, GB/s: the host link's ceiling."""
    host = torch.empty(1 << 27, dtype=torch.bfloat16).pin_memory()
    dev = torch.empty_like(host, device="cuda")
    seconds = timed(lambda: dev.copy_(host, non_blocking=True))
    return gbps(host.numel() * host.element_size(), seconds)


def llama8b(max_positions: int) -> str:
    return shape_spec("llama-3-8b", None, max_positions)


def decode_rate(
    llm: LLM, prompts: list[list[int]], params: SamplingParams, steps: int, profile: bool,
    warmup: int = 0, trace: str | None = None,
) -> tuple[float, dict[str, Any], dict[str, Any]]:
    """(decode tok/s, stats before, stats after) of a batch, timed from `warmup` steps
    after every prompt is prefilled (recall decode captures its CUDA graphs in the first
    two)."""
    engine = llm.engine
    ids = [engine.add_request(p, params) for p in prompts]
    seqs = [engine._seqs[i] for i in ids]
    while any(s.num_output_tokens == 0 for s in seqs):
        engine.step()
    for _ in range(warmup):
        engine.step()
    before = engine.stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    after = engine.stats()
    failed = [s.finish_reason for s in seqs if s.finish_reason not in (None, "length")]
    if failed or any(s.num_output_tokens < steps + warmup for s in seqs):
        raise RuntimeError(f"requests ended early: {failed}")
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
        with torch_profile(activities=activities, record_shapes=True, with_stack=True) as prof:
            for _ in range(3):
                engine.step()
            torch.cuda.synchronize()
        eager = llm.engine.config.enforce_eager
        # graphed steps: also what the host spends launching
        for sort in ["cuda_time_total"] + ([] if eager else ["cpu_time_total"]):
            print(prof.key_averages().table(sort_by=sort, row_limit=40), flush=True)
        by_shape = prof.key_averages(group_by_input_shape=True)
        print(by_shape.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=40,
                             max_shapes_column_width=80), flush=True)
        by_stack = prof.key_averages(group_by_stack_n=6)
        print(by_stack.table(sort_by="self_cuda_time_total", row_limit=25,
                             max_src_column_width=200), flush=True)
        if trace:
            prof.export_chrome_trace(trace)
    for request_id in ids:
        engine.abort(request_id)
    return steps * len(prompts) / elapsed, before, after


MODES = {
    "full": (None, None), "full_offload": ("full_offload", 1e9), "quest": ("quest", 2048),
    "shadowkv": ("shadowkv", 2048), "clusterkv": ("clusterkv", 2048), "pqcache": ("pqcache", 0.1),
    "magicpig": ("magicpig", 2048),
}  # fmt: skip


def recall_deltas(before: dict[str, Any], after: dict[str, Any], tokens: int) -> dict[str, Any]:
    """What the recall store did over the timed decode steps."""
    if "recall_bytes_fetched" not in after:
        return {}
    names = ("recall_bytes_fetched", "recall_decode_steps", "recall_prefetch_bytes")
    delta = {k: after[k] - before[k] for k in names}
    sampled = {k: after[k] for k in ("recall_keys_sampled_per_layer_head",
                                     "recall_sampled_host_ms_per_layer",
                                     "recall_sampled_wait_ms_per_layer",
                                     "recall_sampled_on_host_share")}  # fmt: skip
    return {
        **({} if not after["recall_sampled_host_ms_per_layer"] else sampled),
        "fetched_MB_per_token": delta["recall_bytes_fetched"] / 1e6 / tokens,
        "prefetched_MB_per_token": delta["recall_prefetch_bytes"] / 1e6 / tokens,
        "hit_rate_cumulative": after["recall_working_set_hit_rate"],
        "prefetch_precision_cumulative": after["recall_prefetch_precision"],
        "blocks_per_step_cumulative": after["recall_blocks_attended_per_step"],
    }


def bench_decode(contexts: list[int], batch: int, steps: int, modes: list[str],
                 profile: bool, warmup: int, host_gib: float, pool_gib: float,
                 eager: bool = False, recall_gpu_gib: float = 8.0,
                 page_rows: tuple[int, ...] = (4,), slack: int = 16,
                 working_set_factor: int = 1, trace_dir: str | None = None,
                 arms: dict[str, tuple[bool, ...]] | None = None,
                 overlap_recall: bool = False, prefetch: bool = False) -> None:  # fmt: skip
    """Decode tok/s of each mode at each context, for every combination of page rows and
    `arms` (switch name -> the values to run; a switch not named keeps the engine's
    default)."""
    from strata.engine.engine import LLMEngine

    LLMEngine.overlap_recall = overlap_recall
    link_gbps = pinned_h2d_gbps()
    RESULTS["pinned_h2d_memcpy_GBps"] = link_gbps
    longest = max(contexts) + steps + warmup + slack + 64
    llm = LLM(
        llama8b(longest + 64), max_model_len=longest, kv_cache_memory=pool_gib + recall_gpu_gib,
        kv_recall_gpu_memory=recall_gpu_gib, kv_recall_host_memory=host_gib,
        max_num_batched_tokens=16384, max_num_seqs=max(batch, 8), enforce_eager=eager,
        kv_recall_working_set_factor=working_set_factor, kv_recall_prefetch=prefetch,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    named = list(arms or {})  # arms not named keep the engine's default
    combos = [dict(zip(named, values, strict=True))
              for values in itertools.product(*((arms or {})[n] for n in named))]
    rows = []
    for ctx in contexts:
        prompts = [torch.randint(1000, 100000, (ctx,), generator=g).tolist() for _ in range(batch)]
        runs = [(m, r, c) for m in modes for r in page_rows for c in combos]
        for mode, rows_per_page, combo in runs:
            if mode == "full" and (rows_per_page, combo) != (page_rows[0], combos[0]):
                continue  # no recall rows: these options change nothing
            for name, on in combo.items():
                set_arm(name, on)
            recall = llm.engine.parts.recall
            if recall is not None:  # pages are made as requests arrive: the next ones
                recall.page_rows = rows_per_page
            row = decode_row(llm, prompts, mode, steps, warmup, slack, profile, trace_dir)
            now = {n: engine_default(n) for n in ARMS if n not in COMBINED}
            row.update({"context": ctx, "batch": batch, "page_rows": rows_per_page, **now,
                        "overlap_recall": overlap_recall, "prefetch": prefetch})  # fmt: skip
            if "fetched_MB_per_token" in row:  # the host link's share of the step
                rate_gbps = row["fetched_MB_per_token"] * row["tok_s"] / 1e3
                row["fetch_share_of_pinned_h2d"] = rate_gbps / link_gbps
            rows.append(row)
            print(row, flush=True)
    RESULTS["decode"] = rows


def decode_row(llm: LLM, prompts: list[list[int]], mode: str, steps: int, warmup: int,
               slack: int, profile: bool, trace_dir: str | None) -> dict[str, Any]:  # fmt: skip
    """One timed decode of `prompts` under `mode`: its rate and recall counters, or the
    error of a mode that does not fit (reported, not fatal)."""
    policy, budget = MODES[mode]
    params = SamplingParams(
        max_tokens=steps + warmup + slack, temperature=0, ignore_eos=True,
        kv_policy=policy, kv_budget=budget,
    )  # fmt: skip
    trace = f"{trace_dir}/{mode}_{len(prompts[0])}x{len(prompts)}.json.gz" if trace_dir else None
    try:
        rate, before, after = decode_rate(llm, prompts, params, steps, profile, warmup, trace)
    except Exception as exc:
        return {"mode": mode, "error": repr(exc)[:300]}
    replays = {f"{name}_replays": after.get(f"recall_{name}_replays", 0)
               - before.get(f"recall_{name}_replays", 0) for name in ("graph", "step_graph")}
    held = {"gpu_MB_per_sequence": after["recall_gpu_bytes_used"] / 1e6 / len(prompts)
            } if policy is not None and "recall_gpu_bytes_used" in after else {}  # fmt: skip
    return {"mode": mode, "tok_s": rate, **replays, **held,
            **recall_deltas(before, after, steps * len(prompts))}  # fmt: skip


def bench_beyond(num_seqs: int, context: int, steps: int, policy: str) -> None:
    """num_seqs requests of `context` tokens under `policy` (budget 2048), with a GPU pool
    of 2 GiB and 8 GiB of GPU memory for recall sequences: their KV is many times either.
    Every request must complete its `steps` tokens."""
    longest = context + steps + 64
    llm = LLM(
        llama8b(longest + 64), max_model_len=longest, kv_cache_memory=10.0,
        kv_recall_gpu_memory=8.0, kv_recall_host_memory=8 * num_seqs, kv_policy=policy,
        kv_budget=2048, max_num_batched_tokens=16384, max_num_seqs=num_seqs,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1000, 100000, (context,), generator=g).tolist()
               for _ in range(num_seqs)]  # fmt: skip
    params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    stats = llm.stats()
    kv_per_token = 2 * 32 * 8 * 128 * 2  # Llama-3-8B shape, bf16
    total_kv = num_seqs * (context + steps) * kv_per_token
    pool = stats["kv_blocks_total"] * 16 * kv_per_token
    RESULTS["beyond"] = {
        "policy": policy, "sequences": num_seqs, "context": context, "steps": steps,
        "completed": sum(len(o.token_ids) == steps for o in outs), "seconds": seconds,
        "total_kv_GiB": total_kv / 2**30, "pool_GiB": pool / 2**30,
        "recall_gpu_GiB": stats["recall_gpu_bytes_used"] / 2**30,
        "kv_over_pool": total_kv / pool,
        "kv_over_pool_and_recall_gpu": total_kv / (pool + 8 * 2**30),
        "host_GiB_used_after": stats["recall_host_bytes_used"] / 2**30,
    }  # fmt: skip
    print("beyond", RESULTS["beyond"], flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="uva,decode", help="sections: uva, decode, beyond")
    p.add_argument("--contexts", default="32768,65536,131072", help="prompt lengths")
    p.add_argument("--batch", type=int, default=1, help="requests decoding together")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed")
    p.add_argument("--modes", default="full,full_offload,quest", help=", ".join(MODES))
    p.add_argument("--warmup", type=int, default=2,
                   help="decode steps run before timing (recall captures its graphs there)")
    p.add_argument("--host-gib", type=float, default=48.0, help="kv_recall_host_memory")
    p.add_argument("--pool-gib", type=float, default=32.0, help="the GPU pool (full attention)")
    p.add_argument("--recall-gpu-gib", type=float, default=8.0, help="kv_recall_gpu_memory")
    p.add_argument("--page-rows", default="4",
                   help="kv_recall_page_rows values to run (comma-separated): 1 decodes each "
                        "recall sequence on its own, N up to N of a kind together")
    p.add_argument("--slack", type=int, default=16,
                   help="output tokens past warm-up and timed steps: the decode steps that "
                        "early requests run while later ones are admitted and prefilled")
    for name, meaning in ARMS.items():
        p.add_argument(f"--{name.replace('_', '-')}", choices=("on", "off", "both", "engine"),
                       default="engine", help=f"on: {meaning}; both: an A/B in one process; "
                       "engine (the default): as the engine has it")  # fmt: skip
    p.add_argument("--overlap-recall", action="store_true",
                   help="recall steps launch before the last step's tokens reach the host "
                        "(LLMEngine.overlap_recall; off by default until checked on a GPU)")
    p.add_argument("--prefetch", action="store_true",
                   help="kv_recall_prefetch: each sparse layer's picks guessed from the layer "
                        "before's input and fetched a layer early")
    p.add_argument("--working-set-factor", type=int, default=1,
                   help="kv_recall_working_set_factor: working-set slots per picked block")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table")
    p.add_argument("--trace-dir", default=None,
                   help="with --profile: write each run's Chrome trace (.json.gz) here")
    p.add_argument("--eager", action="store_true",
                   help="no CUDA graphs (a profile then shows every kernel's CUDA time)")
    p.add_argument("--beyond", default="8x32768:shadowkv",
                   help="beyond: SEQSxCONTEXT:POLICY, KV far over the GPU pool")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args()
    only = a.only.split(",")
    print(torch.cuda.get_device_name(), torch.__version__, file=sys.stderr)
    if "uva" in only:
        bench_uva()
    if "decode" in only:
        contexts = [int(c) for c in a.contexts.split(",")]
        values = {"on": (True,), "off": (False,), "both": (False, True)}
        arms = {name: values[getattr(a, name)] for name in ARMS if getattr(a, name) in values}
        bench_decode(contexts, a.batch, a.steps, a.modes.split(","), a.profile, a.warmup,
                     a.host_gib, a.pool_gib, a.eager, a.recall_gpu_gib,
                     tuple(int(r) for r in a.page_rows.split(",")), a.slack,
                     a.working_set_factor, a.trace_dir, arms, a.overlap_recall, a.prefetch)
    if "beyond" in only:
        shape, policy = a.beyond.split(":")
        seqs, context = (int(x) for x in shape.split("x"))
        bench_beyond(seqs, context, a.steps, policy)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(RESULTS, f, indent=1)
    print(json.dumps(RESULTS, indent=1))


if __name__ == "__main__":
    main()
