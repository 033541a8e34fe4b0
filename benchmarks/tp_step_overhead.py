"""Tensor parallelism's per-step costs inside the engine: a batch of greedy requests at
TP=1 and TP=N on the same machine; prints the step time and, for TP=N, the time rank 0
spends sending each step to the workers and in all-reduces.

    python benchmarks/tp_step_overhead.py --model random:qwen2.5-0.5b --device cpu \
        --tp 2 --batch 16 --prompt-len 64 --output-len 16
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Any

import torch

from strata import LLM, SamplingParams


def run(args: argparse.Namespace, tp: int) -> tuple[float, dict[str, Any]]:
    llm = LLM(args.model, device=args.device, kv_cache_memory=args.kv_cache_memory,
              max_model_len=args.prompt_len + args.output_len + 1, tensor_parallel_size=tp)
    prompts = [[(7 * i + j) % 1000 + 10 for j in range(args.prompt_len)] for i in range(args.batch)]
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0))  # warm-up
    before = llm.stats()
    start = time.perf_counter()
    llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    after = llm.stats()
    llm.close()
    return seconds, {k: after[k] - before[k] for k in after if k.startswith("tp_")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:qwen2.5-0.5b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--kv-cache-memory", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.model} on {args.device}, batch {args.batch}, prompt {args.prompt_len}, "
          f"output {args.output_len}, 1 torch thread a rank")
    print("| TP | time s | output tok/s | steps | send ms/step | all-reduce ms/step |")
    print("|---|---|---|---|---|---|")
    for tp in (1, args.tp):
        seconds, stats = run(args, tp)
        tokens = args.batch * args.output_len
        steps = stats.get("tp_steps", 0)
        send, reduce = (
            f"{stats[k] / steps * 1e3:.2f}" if steps else "-"
            for k in ("tp_step_send_seconds", "tp_allreduce_seconds")
        )
        print(f"| {tp} | {seconds:.2f} | {tokens / seconds:.1f} | {steps or '-'} | "
              f"{send} | {reduce} |")


if __name__ == "__main__":
    main()
