"""Measure a real replica's engine steps and fit the simulator's step cost (issue 24).

    python benchmarks/sim_fit.py [--threads 1] [--out strata/sim/fits/smollm2_cpu1.json]

Runs the embedded model (or --model) in-process with torch on --threads threads (a
replica of `strata serve --replicas N --replica-cpus 1` has one), and times every
`engine.step()`: prefills of random prompts of each --prefill-lengths alone (one output
token), then batches of --decode-batches requests of each --decode-contexts length
(their prefill steps, then --decode-steps pure decode steps). Each step's work (query
tokens, sampled rows, attended pairs) comes from the runner's step log. A least-squares
fit (strata/sim/costs.py) of the step seconds is written as JSON with its residuals.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from strata import LLM, SamplingParams
from strata.sim.costs import StepSample, fit_step_cost


def timed_steps(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list[StepSample]:
    engine = llm.engine
    log: list = []
    engine.runner.step_log = log
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
    for ids in prompts:
        engine.add_request(ids, params)
    samples = []
    while engine.has_unfinished():
        before = len(log)
        start = time.perf_counter()
        engine.step()
        seconds = time.perf_counter() - start
        if len(log) == before + 1:  # exactly one model run in this step
            s = log[-1]
            samples.append(StepSample(s.tokens, s.sampled, s.attended_pairs, seconds))
    engine.runner.step_log = None
    return samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--prefill-lengths", type=int, nargs="+",
                   default=[16, 48, 96, 160, 256, 320, 384, 512])  # fmt: skip
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--decode-contexts", type=int, nargs="+", default=[64, 320])
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="strata/sim/fits/smollm2_cpu1.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]  # a shared machine: other jobs slow every step
    rng = np.random.default_rng(args.seed)
    llm = LLM(args.model) if args.model else LLM()
    vocab = len(llm.get_tokenizer())

    def prompt(n: int) -> list[int]:  # random ids: no prefix-cache hit between prompts
        return [int(t) for t in rng.integers(100, vocab - 100, size=n)]

    timed_steps(llm, [prompt(64)], 4)  # warm-up, not fitted
    samples: list[StepSample] = []
    for _ in range(args.repeats):
        for n in args.prefill_lengths:
            samples += timed_steps(llm, [prompt(n)], 1)
        for c in args.decode_contexts:
            for b in args.decode_batches:
                samples += timed_steps(llm, [prompt(c) for _ in range(b)], args.decode_steps)
    note = (f"{args.model or 'embedded SmolLM2-135M'} on {platform.node()} "
            f"({os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} thread(s)), "
            f"{time.strftime('%Y-%m-%d')}: {len(samples)} steps")  # fmt: skip
    cost = fit_step_cost(samples, note)
    cost.fit["load_average_1min"] = [load_before, os.getloadavg()[0]]
    cost.fit["steps"] = [[s.tokens, s.rows, s.pairs, round(s.seconds, 6)] for s in samples]
    cost.save(args.out)
    print(note)
    print(f"base {cost.base_s * 1e3:.2f} ms + {cost.per_token_s * 1e3:.3f} ms/token + "
          f"{cost.per_row_s * 1e3:.3f} ms/row + {cost.per_pair_s * 1e9:.2f} ns/pair; "
          f"mean |rel error| {cost.fit['mean_abs_rel_error']:.3f}, "
          f"max {cost.fit['max_abs_rel_error']:.3f}")  # fmt: skip
    for n in (16, 256, 512):
        print(f"  prefill {n}: measured "
              f"{np.median([s.seconds for s in samples if s.tokens == n and s.rows == 1]):.4f} s, "
              f"fit {cost.seconds(n, 1, n * (n + 1) // 2):.4f} s")  # fmt: skip


if __name__ == "__main__":
    main()
