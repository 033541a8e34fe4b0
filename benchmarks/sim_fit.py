"""Measure a real replica's engine steps and fit the simulator's step cost (issue 24).

    python benchmarks/sim_fit.py [--threads 1] [--out strata/sim/fits/smollm2_cpu1.json]
    python benchmarks/sim_fit.py --model random:llama-3.2-1b --device cuda \
        --prefill-lengths 128 512 1024 2048 --decode-batches 1 16 64 256 \
        --decode-contexts 512 2048 --out strata/sim/fits/llama1b_h100.json

Runs the embedded model (or --model) in-process with torch on --threads threads (a
replica of `strata serve --replicas N --replica-cpus 1` has one), and times every
`engine.step()`: prefills of random prompts of each --prefill-lengths alone (one output
token), then batches of --decode-batches requests of each --decode-contexts length
(their prefill steps, then --decode-steps pure decode steps). Each step's work (query
tokens, sampled rows, attended pairs) comes from the runner's step log. A least-squares
fit (strata/sim/costs.py) of the step seconds is written as JSON with its residuals.

--twins K starts K more copies of the same measurement in the background while this one
measures (and ends them after): the other replicas of a run, each stepping on its own
core, slow this one's steps through shared caches, memory bandwidth and the scheduler.

Steps run synchronously (overlap scheduling off), so each `engine.step()` is one model
run from launch to sampled tokens on the host, the unit the simulator's replica steps in.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch

from strata import LLM, SamplingParams
from strata.engine.plan import StepPlan
from strata.sim.costs import StepSample, StepWork, chunk_pairs, fit_step_cost


def work_of(plan: StepPlan) -> StepWork:
    rows = prefill_pairs = decode_pairs = 0
    for c in plan.chunks:
        pairs = chunk_pairs(c.start, c.end)
        if c.start >= c.seq.num_prompt_tokens:
            decode_pairs += pairs
        else:
            prefill_pairs += pairs
        rows += c.samples
    return StepWork(plan.num_tokens, rows, prefill_pairs, decode_pairs)


def timed_steps(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list[StepSample]:
    """Run the prompts to the end; each step that ran the model once, with its work."""
    engine = llm.engine
    works: list[StepWork] = []
    execute = engine.runner.execute

    def recording(plan: StepPlan) -> Any:
        works.append(work_of(plan))  # before the step: `samples` reads the sequence's length
        return execute(plan)

    engine.runner.execute = recording  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
    for ids in prompts:
        engine.add_request(ids, params)
    samples = []
    while engine.has_unfinished():
        before = len(works)
        start = time.perf_counter()
        engine.step()
        seconds = time.perf_counter() - start
        if len(works) == before + 1:  # exactly one model run in this step
            samples.append(StepSample(works[-1], seconds))
    engine.runner.execute = execute  # type: ignore[method-assign]
    return samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the engine's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--prefill-lengths", type=int, nargs="+",
                   default=[16, 48, 96, 160, 256, 320, 384, 512])  # fmt: skip
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--decode-contexts", type=int, nargs="+", default=[64, 320])
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="strata/sim/fits/smollm2_cpu1.json")
    p.add_argument("--twins", type=int, default=0, help="copies measuring alongside (default 0)")
    p.add_argument("--twin", action="store_true", help=argparse.SUPPRESS)  # a copy: no output
    args = p.parse_args()
    twins = [
        subprocess.Popen([sys.executable, *sys.argv, "--twin", "--twins", "0"])
        for _ in range(0 if args.twin else args.twins)
    ]
    try:
        measure(args)
    finally:
        for twin in twins:
            twin.terminate()
            twin.wait()


def measure(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]  # a shared machine: other jobs slow every step
    rng = np.random.default_rng(args.seed)
    options = {"overlap_scheduling": "off"}
    if args.device is not None:
        options["device"] = args.device
    llm = LLM(args.model, **options)
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
    if args.twin:
        while True:  # keep loading the machine until the measuring copy ends this one
            timed_steps(llm, [prompt(n) for n in args.prefill_lengths[:4]], args.decode_steps)
    where = torch.cuda.get_device_name() if llm.engine.device.type == "cuda" else "cpu"
    note = (f"{args.model or 'embedded SmolLM2-135M'} on {platform.node()}, {where} "
            f"({os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} thread(s), "
            f"{args.twins} twin(s)), "
            f"{time.strftime('%Y-%m-%d')}: {len(samples)} steps")  # fmt: skip
    cost = fit_step_cost(samples, note)
    cost.fit["load_average_1min"] = [load_before, os.getloadavg()[0]]
    cost.fit["steps"] = [[*s.work.features()[1:], round(s.seconds, 6)] for s in samples]
    cost.save(args.out)
    print(note)
    print(
        f"base {cost.base_s * 1e3:.2f} ms + {cost.per_token_s * 1e3:.3f} ms/token + "
        f"{cost.per_row_s * 1e3:.3f} ms/row + {cost.per_prefill_pair_s * 1e9:.1f} ns/prefill "
        f"pair + {cost.per_decode_pair_s * 1e9:.1f} ns/decode pair; mean |rel error| "
        f"{cost.fit['mean_abs_rel_error']:.3f}, max {cost.fit['max_abs_rel_error']:.3f}"
    )
    for n in sorted({args.prefill_lengths[0], args.prefill_lengths[-1]}):
        work = StepWork(n, 1, chunk_pairs(0, n), 0)
        measured = [s.seconds for s in samples if s.work == work]
        print(
            f"  prefill {n}: measured {np.median(measured):.4f} s, fit {cost.seconds(work):.4f} s"
        )
    for b, c in ((args.decode_batches[0], args.decode_contexts[-1]),
                 (args.decode_batches[-1], args.decode_contexts[-1])):
        work = StepWork(b, b, 0, b * (c + 1))
        print(f"  decode {b} rows at {c}: fit {cost.seconds(work):.4f} s")


if __name__ == "__main__":
    main()
