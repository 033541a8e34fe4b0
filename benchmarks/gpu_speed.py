"""Strata's speed on the GPU against the roofline measured in the same run.

decode    single-stream decode of Llama-3-8B shape (bf16) at contexts 128, 4k, 32k:
          tok/s and (weights + KV read per token) / step time over copy bandwidth;
          CUDA graphs on/off, fused ops on/off
prefill   one 8k / 32k prompt: causal TFLOP/s over the bf16 matmul rate
syncs     host syncs per step under torch.cuda.set_sync_debug_mode("warn")
profile   torch.profiler kernel summary of eager decode at 4k and an 8k prefill
offline   256 requests, in/out uniform 100-1024, ignore_eos: output tok/s, the
          workload roofline, and HF transformers generate on a subset

python benchmarks/gpu_speed.py [--only decode,prefill,...] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from typing import Any

import torch
from roofline import Ceilings, ModelWork, measure_ceilings

from strata import LLM, SamplingParams
from strata.bench.host_syncs import host_syncs
from strata.bench.moe import shape_spec
from strata.bench.throughput import load_hf_twin, run_hf, run_strata
from strata.bench.workload import Workload, random_workload

SECTIONS = ("decode", "prefill", "fusion", "syncs", "profile", "offline", "repeat")
RESULTS: dict[str, Any] = {}


def timed_generate(llm: LLM, prompt: list[int], max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate([prompt], params)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def prompt_of(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 100000, (n,), generator=g).tolist()


def decode_time(llm: LLM, ctx: int, new: int = 64) -> float:
    """Seconds per decode step at context ~ctx: (prefill + new steps) - (prefill + 1)."""
    prompt = prompt_of(ctx, ctx)
    one = min(timed_generate(llm, prompt, 1) for _ in range(2))
    many = min(timed_generate(llm, prompt, new + 1) for _ in range(2))
    return (many - one) / new


def section_decode(llm: LLM, ceil: Ceilings) -> None:
    work = ModelWork.of(llm.engine.model_config)
    runner = llm.engine.runner
    graphs = runner.graphs
    rows = []
    print("\n== decode, batch 1, Llama-3-8B shape bf16 ==")
    print(f"{'context':>8} {'mode':<18} {'ms/tok':>8} {'tok/s':>8} {'GB/s':>8} {'roofline':>9}")
    for ctx in (128, 4096, 32768):
        modes = [("graphs+fused", graphs, True), ("eager+fused", None, True)]
        for mode, g, fused in modes:
            runner.graphs = g
            llm.engine.loaded.model.set_fused_ops(fused)
            step = decode_time(llm, ctx)
            nbytes = work.weight_bytes + work.kv_bytes_per_token * (ctx + 32)
            frac = nbytes / step / ceil.copy_bytes_per_s
            rows.append({"context": ctx, "mode": mode, "step_s": step, "bytes": nbytes,
                         "fraction_of_copy_bw": frac})  # fmt: skip
            print(f"{ctx:>8} {mode:<18} {step * 1e3:>8.3f} {1 / step:>8.1f} "
                  f"{nbytes / step / 1e9:>8.0f} {frac:>8.1%}")  # fmt: skip
    runner.graphs = graphs
    RESULTS["decode"] = rows


FUSIONS = {"none": (), "add+rmsnorm": ("RMSNorm",), "silu*mul": ("MLP",),
           "rope+kv write": ("Attention",), "all": ("RMSNorm", "MLP", "Attention")}  # fmt: skip


def set_fusions(model: torch.nn.Module, kinds: tuple[str, ...]) -> None:
    for module in model.modules():
        if hasattr(module, "fused"):
            module.fused = type(module).__name__ in kinds


def section_fusion(llm: LLM, ceil: Ceilings) -> None:
    """Same model, same run: graphs recaptured for each set of fused kernels."""
    model = llm.engine.loaded.model
    runner = llm.engine.runner
    max_batch = runner.graphs.max_batch if runner.graphs else 8
    rows = []
    print("\n== fused kernels, Llama-3-8B shape bf16: decode (graphs) and prefill ==")
    for label, kinds in FUSIONS.items():
        set_fusions(model, kinds)
        runner.graphs = None
        gc.collect()
        runner.capture_graphs(max_batch, llm.engine.max_model_len)
        dec = decode_time(llm, 4096)
        pre = min(timed_generate(llm, prompt_of(8192, 7), 1) for _ in range(2))
        rows.append({"fused": label, "decode_4k_step_s": dec, "prefill_8k_s": pre})
        print(f"{label:<14} decode@4k {dec * 1e3:.3f} ms/tok   prefill 8k {pre * 1e3:.1f} ms")
    RESULTS["fusion"] = rows


def section_prefill(llm: LLM, ceil: Ceilings) -> None:
    work = ModelWork.of(llm.engine.model_config)
    rows = []
    print("\n== prefill, one prompt, Llama-3-8B shape bf16 ==")
    for n in (8192, 32768):
        prompt = prompt_of(n, n + 1)
        t = min(timed_generate(llm, prompt, 1) for _ in range(2))
        flops = (
            2 * work.layer_params * n
            + 2 * work.head_params
            + work.attn_flops_per_pair * n * (n + 1) / 2
        )
        frac = flops / t / ceil.matmul_flops_per_s
        rows.append({"tokens": n, "seconds": t, "flops": flops, "fraction_of_matmul": frac})
        print(f"{n:>6} tokens {t * 1e3:>9.1f} ms {flops / t / 1e12:>7.1f} TFLOP/s {frac:>7.1%}")
    RESULTS["prefill"] = rows


def section_syncs(llm: LLM) -> None:
    """Host syncs in the step loop, as torch reports them."""
    engine = llm.engine
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, ignore_eos=True)
    for i in range(4):
        engine.add_request(prompt_of(300 + 50 * i, i), params)
    steps = 0
    with host_syncs() as where:
        while engine.has_unfinished():
            engine.step()
            steps += 1
    print(f"\n== host syncs: {where.total()} warnings over {steps} steps ==")
    for loc, n in where.most_common(10):
        print(f"  {n:>4}  {loc}")
    RESULTS["syncs"] = {"steps": steps, "warnings": where.total(), "where": dict(where)}


def section_profile(llm: LLM) -> None:
    from torch.profiler import ProfilerActivity, profile

    runner = llm.engine.runner
    graphs, runner.graphs = runner.graphs, None
    prompt = prompt_of(4096, 3)
    timed_generate(llm, prompt, 4)
    for name, fn in (
        ("eager decode at 4k (16 steps)", lambda: timed_generate(llm, prompt, 17)),
        ("prefill 8k", lambda: timed_generate(llm, prompt_of(8192, 9), 1)),
    ):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
        print(f"\n== profile: {name} ==")
        print(
            prof.key_averages().table(
                sort_by="cuda_time_total", row_limit=14, max_name_column_width=60
            )
        )
    runner.graphs = graphs


def roofline_row(name: str, llm: LLM, wl: Workload, ceil: Ceilings) -> dict[str, Any]:
    runner = llm.engine.runner
    runner.step_log = []
    res = run_strata(llm, wl, len(wl.prompts))
    steps, runner.step_log = runner.step_log, None
    work = ModelWork.of(llm.engine.model_config)
    floor = work.floor_seconds(steps, ceil)
    return {
        "model": name, "seconds": res.seconds, "output_tok_s": res.output_tokens_per_s,
        "steps": len(steps), "graph_steps": sum(s.graph for s in steps),
        "roofline_seconds": floor, "fraction_of_roofline": floor / res.seconds,
        "output_tokens": res.output_tokens, "input_tokens": res.input_tokens,
    }  # fmt: skip


def section_offline(ceil: Ceilings, hf_subset: int, hf_batch: int) -> None:
    rows = []
    print("\n== offline throughput: 256 requests, in/out uniform 100-1024, ignore_eos ==")
    for name in ("llama-3.2-1b", "llama-3-8b"):
        total = torch.cuda.get_device_properties(0).total_memory / (1 << 30)
        llm = LLM(f"random:{name}", kv_cache_memory=min(60.0, 0.42 * total),
                  max_num_batched_tokens=4096, max_model_len=2048)  # fmt: skip
        vocab = llm.engine.model_config.vocab_size
        wl = random_workload(256, (100, 1024), (100, 1024), vocab, 0)
        run_strata(llm, random_workload(4, (16, 16), (4, 4), vocab, 1), 4)
        row = roofline_row(name, llm, wl, ceil)
        rows.append(row)
        print(f"{name}: Strata {row['output_tok_s']:.0f} out tok/s in {row['seconds']:.1f} s "
              f"({row['steps']} steps, {row['graph_steps']} from graphs), roofline "
              f"{row['roofline_seconds']:.1f} s = {row['fraction_of_roofline']:.1%}")  # fmt: skip
        if hf_subset > 0:
            section_offline_hf(llm, wl, row, hf_subset, hf_batch)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    RESULTS["offline"] = rows


def section_offline_hf(
    llm: LLM, wl: Workload, row: dict[str, Any], hf_subset: int, hf_batch: int
) -> None:
    """HF transformers generate on the first hf_subset requests, beside Strata's row."""
    sub = Workload(wl.prompts[:hf_subset], wl.output_lens[:hf_subset])
    hf = load_hf_twin(llm)
    vocab = llm.engine.model_config.vocab_size
    run_hf(hf, random_workload(2, (16, 16), (4, 4), vocab, 1), 2, llm.engine.device)
    hf_res = run_hf(hf, sub, hf_batch, llm.engine.device)
    row.update(hf_requests=hf_subset, hf_batch=hf_batch, hf_seconds=hf_res.seconds,
               hf_output_tok_s=hf_res.output_tokens_per_s,
               ratio=row["output_tok_s"] / hf_res.output_tokens_per_s)  # fmt: skip
    print(f"  HF (first {hf_subset} requests, batch {hf_batch}) "
          f"{hf_res.output_tokens_per_s:.0f} out tok/s in {hf_res.seconds:.1f} s; "
          f"ratio {row['ratio']:.1f}x")  # fmt: skip
    del hf


def section_repeat(ceil: Ceilings) -> None:
    """The 1B offline workload twice in one process: first-run costs (kernel compiles,
    allocator growth) against the steady state, with a step-time profile of the start."""
    llm = LLM("random:llama-3.2-1b", kv_cache_memory=40, max_num_batched_tokens=4096,
              max_model_len=2048)  # fmt: skip
    vocab = llm.engine.model_config.vocab_size
    wl = random_workload(256, (100, 1024), (100, 1024), vocab, 0)
    fresh = random_workload(256, (100, 1024), (100, 1024), vocab, 1)  # no prefix-cache hits
    rows = [roofline_row("llama-3.2-1b", llm, w, ceil) for w in (wl, fresh)]
    for i, row in enumerate(rows):
        print(f"run {i + 1}: {row['output_tok_s']:.0f} out tok/s in {row['seconds']:.2f} s, "
              f"roofline {row['fraction_of_roofline']:.1%}")  # fmt: skip
    engine = llm.engine
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    for prompt in wl.prompts:
        engine.add_request(prompt, params)
    times = []
    while engine.has_unfinished():
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - t) * 1e3)
    print("step ms, 256 prompts then 40 decode steps:", " ".join(f"{x:.1f}" for x in times))
    RESULTS["repeat"] = {"runs": rows, "step_ms": times}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--json", default=None, help="write all numbers here")
    parser.add_argument("--hf-subset", type=int, default=64, help="HF requests (0: no HF run)")
    parser.add_argument("--hf-batch", type=int, default=64)
    args = parser.parse_args()
    only = set(args.only.split(","))
    device = torch.device("cuda")
    ceil = measure_ceilings(device)
    RESULTS["device"] = torch.cuda.get_device_name()
    RESULTS["ceilings"] = {"copy_bytes_per_s": ceil.copy_bytes_per_s,
                           "matmul_flops_per_s": ceil.matmul_flops_per_s}  # fmt: skip
    print(f"{RESULTS['device']}: copy {ceil.copy_bytes_per_s / 1e12:.2f} TB/s (read+write), "
          f"bf16 matmul {ceil.matmul_flops_per_s / 1e12:.0f} TFLOP/s")  # fmt: skip
    try:
        if only & {"decode", "prefill", "syncs", "profile", "fusion"}:
            long_8b = shape_spec("llama-3-8b", None, 33280)
            llm = LLM(long_8b, kv_cache_memory=12, max_model_len=33280,
                      max_num_batched_tokens=32768, max_num_seqs=8,
                      enable_prefix_caching=False)  # fmt: skip
            ceil_sections = [("decode", section_decode), ("prefill", section_prefill),
                             ("fusion", section_fusion)]  # fmt: skip
            for name, fn in ceil_sections:
                if name in only:
                    fn(llm, ceil)
            if "syncs" in only:
                section_syncs(llm)
            if "profile" in only:
                section_profile(llm)
            del llm
            gc.collect()
            torch.cuda.empty_cache()
        if "offline" in only:
            section_offline(ceil, args.hf_subset, args.hf_batch)
        if "repeat" in only:
            section_repeat(ceil)
    finally:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(RESULTS, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
