"""Structured-output overhead: xgrammar's compile and mask times, and engine throughput
with half the requests constrained by a JSON schema.

    python benchmarks/grammar_overhead.py masks
        CPU only, no model: the embedded model's tokenizer (49,152 tokens). Prints the
        tokenizer-info build time, the compile time of a realistic schema (cold), and the
        time to fill one token bitmask per step, alone and for a batch of matchers.
    python benchmarks/grammar_overhead.py gil [--batch 128] [--host-ms 2.5]
        CPU only: a mask worker beside an engine thread that runs Python (the step time
        with the fill serial, on a plain worker, and on a worker handed the GIL).
    python benchmarks/grammar_overhead.py engine --model random:llama-3.2-1b --device cuda
        The GPU run (the issue's goal: <= 5% lower throughput): N requests; once with
        every other one constrained by the schema (a document ends with its grammar),
        then with none constrained and each request held to the length it had, so both
        runs step through the same batches. Prints output tokens/s for both, the time a
        build of the step's masks takes on the serial path (waiting for the worker,
        upload) and the worker's fill per step.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from typing import Any

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{6}$"},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "email": {"type": "string"},
                "tier": {"enum": ["free", "pro", "enterprise"]},
            },
            "required": ["name", "email", "tier"],
        },
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 10,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
                    "price": {"type": "number", "minimum": 0},
                },
                "required": ["sku", "quantity", "price"],
            },
        },
        "express": {"type": "boolean"},
        "notes": {"type": ["string", "null"]},
    },
    "required": ["order_id", "customer", "items", "express"],
}
DOCUMENT = {
    "order_id": "ABC-123456",
    "customer": {"name": "Ada Lovelace", "email": "ada@example.com", "tier": "pro"},
    "items": [
        {"sku": "X-1", "quantity": 2, "price": 9.5},
        {"sku": "Y-22", "quantity": 1, "price": 120.0},
    ],
    "express": False,
    "notes": None,
}


def _runs(values: list[float]) -> str:
    return ", ".join(f"{v:,.0f}" for v in values)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def masks(batch: int) -> None:
    import xgrammar
    from transformers import AutoTokenizer

    from strata.models.embedded import embedded_model_path
    from strata.models.loader import gguf_to_folder

    tokenizer = AutoTokenizer.from_pretrained(gguf_to_folder(embedded_model_path()))
    start = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=49152)
    info_s = time.perf_counter() - start
    compile_s = []
    for _ in range(3):
        compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        start = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
        compile_s.append(time.perf_counter() - start)
    tokens = tokenizer.encode(json.dumps(DOCUMENT, indent=2), add_special_tokens=False)
    matchers = [xgrammar.GrammarMatcher(compiled) for _ in range(batch)]
    one = xgrammar.allocate_token_bitmask(1, 49152)
    many = xgrammar.allocate_token_bitmask(batch, 49152)
    batcher = xgrammar.BatchGrammarMatcher()
    single_s, batch_s = [], []
    for token in tokens:
        start = time.perf_counter()
        matchers[0].fill_next_token_bitmask(one, 0)
        single_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        batcher.batch_fill_next_token_bitmask(matchers, many)
        batch_s.append(time.perf_counter() - start)
        for m in matchers:
            assert m.accept_token(token)
    print(f"CPU: {platform.machine()}, {os.cpu_count()} cores, xgrammar {version('xgrammar')}")
    print(f"vocabulary 49152 (SmolLM2), document {len(tokens)} tokens, batch {batch}")
    print(f"tokenizer info build      {_ms(info_s)}")
    print(f"schema compile (cold)     median {_ms(statistics.median(compile_s))}")
    print(f"mask fill, 1 matcher      median {_ms(statistics.median(single_s))}, "
          f"p90 {_ms(statistics.quantiles(single_s, n=10)[-1])}, max {_ms(max(single_s))}")
    import torch

    from strata.engine.grammar_mask import GrammarMasks

    logits = torch.randn(batch, 49152)
    rows = list(range(0, batch, 2))
    apply_s = []
    for _ in range(20):
        start = time.perf_counter()
        GrammarMasks(rows, many).apply(logits)
        apply_s.append(time.perf_counter() - start)
    print(f"mask apply (CPU), {batch} rows, half masked: median {_ms(statistics.median(apply_s))}")
    print(f"mask fill, {batch} matchers    median {_ms(statistics.median(batch_s))} per step "
          f"({_ms(statistics.median(batch_s) / batch)} per row)")


def random_allowed(bitmask: Any, vocab: int, stop: int, rng: Any) -> list[int]:
    """For each row of a filled bitmask, one token it allows (not `stop`), drawn by rng."""
    import torch

    bits = (bitmask[:, :, None] >> torch.arange(32)) & 1
    allowed = bits.flatten(1)[:, :vocab]
    allowed[:, stop] = 0
    return [rng.choice(torch.nonzero(row).flatten().tolist()) for row in allowed]


def walks(batch: int, tokenizer_path: str | None, steps: int, vocab: int | None) -> None:
    """Accept and fill per step for `batch` matchers walking the valid document (the tokens a
    model that writes the document produces) against walking random allowed tokens (what
    random weights sample), on one tokenizer."""
    import random

    import xgrammar
    from transformers import AutoTokenizer

    from strata.models.embedded import embedded_model_path
    from strata.models.loader import gguf_to_folder

    path = tokenizer_path or str(gguf_to_folder(embedded_model_path()))
    tokenizer = AutoTokenizer.from_pretrained(path)
    vocab = vocab or len(tokenizer)  # a model's vocabulary may be padded past the tokenizer's
    stop = tokenizer.eos_token_id
    info = xgrammar.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=vocab, stop_token_ids=[stop]
    )
    compiled = xgrammar.GrammarCompiler(info).compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=False
    )
    document = tokenizer.encode(json.dumps(DOCUMENT), add_special_tokens=False)
    bitmask = xgrammar.allocate_token_bitmask(batch, vocab)
    batcher = xgrammar.BatchGrammarMatcher()
    rng = random.Random(0)
    print(f"CPU: {platform.machine()}, {os.cpu_count()} cores, xgrammar {version('xgrammar')}")
    print(f"vocabulary {vocab} ({path}), {batch} matchers, up to {steps} steps")
    print("| walk | steps | fill per step | accept per step (batch call) | accept per token |")
    print("|---|---|---|---|---|")
    for name in ("valid document", "random allowed tokens"):
        matchers = [xgrammar.GrammarMatcher(compiled) for _ in range(batch)]
        fill_s, accept_s = [], []
        for step in range(min(steps, len(document))):
            start = time.perf_counter()
            batcher.batch_fill_next_token_bitmask(matchers, bitmask)
            fill_s.append(time.perf_counter() - start)
            if name == "valid document":
                tokens = [document[step]] * batch
            else:
                tokens = random_allowed(bitmask, vocab, stop, rng)
            start = time.perf_counter()
            ok = xgrammar.BatchGrammarMatcher.batch_accept_token(matchers, tokens)
            accept_s.append(time.perf_counter() - start)
            assert all(ok)
        fill, accept = statistics.median(fill_s), statistics.median(accept_s)
        print(f"| {name} | {len(fill_s)} | {_ms(fill)} | {_ms(accept)} | "
              f"{accept / batch * 1e6:.2f} us |")


def gil(batch: int, host_ms: float, steps: int) -> None:
    """What a grammar worker thread costs an engine thread that runs Python: per step, the
    engine thread spends `host_ms` of pure Python (scheduling, outputs) and the step's
    masks are filled for `batch` matchers walking the document, (serial) on the engine
    thread, (worker) submitted to a worker thread, (handover) submitted, then waiting until
    the worker runs, as GrammarMaskBuilder.advance does. The step ends when both are done."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import xgrammar
    from transformers import AutoTokenizer

    from strata.models.embedded import embedded_model_path
    from strata.models.loader import gguf_to_folder

    tokenizer = AutoTokenizer.from_pretrained(gguf_to_folder(embedded_model_path()))
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    compiled = xgrammar.GrammarCompiler(info).compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=False
    )
    document = tokenizer.encode(json.dumps(DOCUMENT), add_special_tokens=False)
    steps = min(steps, len(document) // 2)
    offsets = [i % (len(document) - steps) for i in range(batch)]
    bitmask = xgrammar.allocate_token_bitmask(batch, len(tokenizer))
    batcher = xgrammar.BatchGrammarMatcher()
    pool = ThreadPoolExecutor(1)
    started = threading.Event()

    def python(n: int) -> int:  # the engine thread's own work: a fixed amount of bytecode
        total = 0
        for i in range(n):
            total += i
        return total

    start = time.perf_counter()
    python(1_000_000)
    per_ms = int(1_000 / (time.perf_counter() - start))
    host_n = int(per_ms * host_ms)

    def fill(matchers: list[Any]) -> None:
        started.set()
        batcher.batch_fill_next_token_bitmask(matchers, bitmask)

    def walk(mode: str) -> float:
        matchers = [xgrammar.GrammarMatcher(compiled) for _ in range(batch)]
        for matcher, offset in zip(matchers, offsets, strict=True):
            assert all(matcher.accept_token(t) for t in document[:offset])
        begin = time.perf_counter()
        for step in range(steps):
            if mode == "serial":
                fill(matchers)
            job = pool.submit(fill, matchers) if mode in ("worker", "handover") else None
            if mode == "handover":
                started.wait()
            python(host_n)
            if job is not None:
                job.result()
            started.clear()
            if mode != "none":
                tokens = [document[offset + step] for offset in offsets]
                assert all(xgrammar.BatchGrammarMatcher.batch_accept_token(matchers, tokens))
        return (time.perf_counter() - begin) / steps

    print(f"CPU: {platform.machine()}, {os.cpu_count()} cores, xgrammar {version('xgrammar')}, "
          f"switch interval {sys.getswitchinterval() * 1e3:.1f} ms")
    print(f"{batch} matchers walking the document from {len(set(offsets))} offsets "
          f"({steps} steps); {host_ms} ms of Python on the engine thread a step; best of 3 walks")
    print("| fill | step | over the Python alone |")
    print("|---|---|---|")
    alone = min(walk("none") for _ in range(3))
    print(f"| none | {_ms(alone)} | |")
    for mode in ("serial", "worker", "handover"):
        step = min(walk(mode) for _ in range(3))
        print(f"| {mode} | {_ms(step)} | +{_ms(step - alone)} |")
    pool.shutdown()


def _kernel_profiler() -> Any:
    """A torch profiler of CPU ops and CUDA kernels (not started)."""
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])


class PhaseTimer:
    """Host seconds of named engine methods, summed per engine step (an `Engine.step`
    call), wrapped on the instances: `phases(steps)` gives each phase's median."""

    def __init__(self, llm: Any) -> None:
        engine = llm.engine
        self.steps: list[dict[str, float]] = []
        self._current: dict[str, float] = defaultdict(float)
        targets = (
            ("take tokens (wait + outputs)", engine, "_take_sampled"),
            ("sample (masks + sampler launch)", engine, "_sample_running"),
            ("schedule", engine.scheduler, "schedule"),
            ("launch forward", engine.runner, "launch"),
            ("masks: advance", engine.runner.grammar_masks, "advance"),
            ("masks: build", engine.runner.grammar_masks, "build"),
            ("sampling batch", engine.runner, "_sampling_batch"),
            ("sampler", engine.runner, "sampler"),
        )
        for name, owner, attr in targets:
            setattr(owner, attr, self._timed(name, getattr(owner, attr)))
        step = engine.step

        def timed_step() -> Any:
            start = time.perf_counter()
            out = step()
            self._current["step"] = time.perf_counter() - start
            self.steps.append(dict(self._current))
            self._current.clear()
            return out

        engine.step = timed_step

    def _timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._current[name] += time.perf_counter() - start

        return timed

    def report(self, first: int, title: str) -> None:
        """Medians over the steps since index `first`, in ms."""
        steps = self.steps[first:]
        names = list(dict.fromkeys(k for s in steps for k in s))
        print(f"--- host time per engine step, {title} ({len(steps)} steps), median / mean ms")
        for name in sorted(names, key=lambda n: n != "step"):
            values = [s.get(name, 0.0) * 1e3 for s in steps]
            print(f"  {name:<34} {statistics.median(values):7.3f} / {statistics.mean(values):7.3f}")


@contextmanager
def sync_warnings(title: str) -> Iterator[None]:
    """Print where the host waited for the device inside the block (CUDA only)."""
    from strata.bench.host_syncs import host_syncs

    with host_syncs() as where:
        yield
    print(f"--- host syncs, {title}: {where.total()} warnings")
    for place, n in where.most_common(12):
        print(f"  {n:>6}  {place}")


# Two names for one call, so that a profile of the process (py-spy, spy_summary.py
# --scope) tells the two runs apart.
def generate_constrained(llm: Any, prompts: list[str], params: list[Any]) -> Any:
    return llm.generate(prompts, params)


def generate_unconstrained(llm: Any, prompts: list[str], params: list[Any]) -> Any:
    return llm.generate(prompts, params)


def engine(
    model: str, device: str, num_requests: int, output_len: int, profile: bool,
    serial: bool = False, overlap: str = "auto", repeats: int = 1, phases: bool = False,
    sync_debug: bool = False, fill_threads: int = 0, accept_on_worker: bool = False,
    sample_after_schedule: bool = False,
) -> None:  # fmt: skip
    from strata import LLM, SamplingParams
    from strata.engine.structured_output import StructuredOutput

    llm = LLM(None if model == "embedded" else model, device=device, overlap_scheduling=overlap)
    builder = llm.engine.runner.grammar_masks
    original = builder.build
    mask_s: list[float] = []

    def timed(*args: Any) -> Any:
        start = time.perf_counter()
        out = original(*args)
        if out is not None:
            mask_s.append(time.perf_counter() - start)
        return out

    builder.build = timed  # type: ignore[method-assign]
    builder.fill_threads = fill_threads
    builder.accept_on_worker = accept_on_worker
    llm.engine.sample_after_schedule = sample_after_schedule
    if serial:
        builder.advance = lambda seqs: None  # type: ignore[method-assign]
    so = StructuredOutput.json_schema(SCHEMA)
    prompts = [f"Write order number {i} as JSON." for i in range(num_requests)]
    timer = PhaseTimer(llm) if phases else None

    def run(constrained: bool, lengths: list[int]) -> tuple[float, list[int]]:
        params = [
            SamplingParams(
                max_tokens=lengths[i],
                temperature=0.8,
                seed=i,
                ignore_eos=True,
                structured_output=so if constrained and i % 2 else None,
            )
            for i in range(num_requests)
        ]
        llm.generate(prompts[:8], params[:8])  # warm-up (and the compile)
        name = "constrained" if constrained else "unconstrained"
        profiler = cProfile.Profile() if profile else None
        kernels = _kernel_profiler() if profile and device == "cuda" else None
        steps_before = len(mask_s)
        timed_before = 0 if timer is None else len(timer.steps)
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        if kernels is not None:
            kernels.start()
        generate = generate_constrained if constrained else generate_unconstrained
        if sync_debug and device == "cuda":
            with sync_warnings(f"{name} run"):
                outs = generate(llm, prompts, params)
        else:
            outs = generate(llm, prompts, params)
        seconds = time.perf_counter() - start
        if timer is not None:
            timer.report(timed_before, f"{name} run")
        if kernels is not None:
            kernels.stop()
            print(f"--- device kernels, {name} run ({len(mask_s) - steps_before} masked steps)")
            table = kernels.key_averages().table(sort_by="self_device_time_total", row_limit=20)
            print(table)
        if profiler is not None:
            profiler.disable()
            print(f"--- host profile, {name} run")
            pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
        got = [len(o.token_ids) for o in outs]
        return sum(got) / seconds, got

    # The constrained run first: a JSON document ends when its grammar does, so the
    # unconstrained run then produces exactly its lengths, request by request, and both
    # runs step through the same batch sizes; only the grammar's work differs. Repeats
    # alternate the two (seeded requests: a constrained repeat has the same lengths).
    mixed, lengths = run(True, [output_len] * num_requests)
    masked_steps = list(mask_s)
    mixed_runs, base_runs = [mixed], []
    for r in range(repeats):
        base_runs.append(run(False, lengths)[0])
        if r + 1 < repeats:
            again, got = run(True, [output_len] * num_requests)
            if got != lengths:
                print("note: a constrained repeat produced other lengths")
            mixed_runs.append(again)
    base, mixed = statistics.median(base_runs), statistics.median(mixed_runs)
    print(f"{model} on {device} (overlap {llm.engine.overlap}), {num_requests} requests, "
          f"output up to {output_len} tokens "
          f"({sum(lengths):,} in all, the constrained ones' own lengths in both runs), "
          f"median of {repeats} run(s) each")
    print(f"unconstrained           {base:,.0f} output tokens/s  ({_runs(base_runs)})")
    print(f"half JSON-constrained   {mixed:,.0f} output tokens/s ({mixed / base - 1:+.1%})  "
          f"({_runs(mixed_runs)})")
    if builder.worker_seconds:
        worker = statistics.median(builder.worker_seconds)
        print(f"fill on the worker      median {_ms(worker)} per step (off the serial path)")
    if masked_steps:
        print(f"mask build (serial)     median {_ms(statistics.median(masked_steps))} per step "
              f"over {len(masked_steps)} steps")


def _side_fills(tokenizer_path: str, batch: int, threads: int, period_ms: float) -> None:
    """Another process's grammar work: `batch` matchers walk random allowed tokens, one fill
    and one accept every `period_ms`, until killed."""
    import random

    import xgrammar
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    vocab = len(tokenizer)
    info = xgrammar.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=vocab, stop_token_ids=[tokenizer.eos_token_id]
    )
    compiled = xgrammar.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA))
    bitmask = xgrammar.allocate_token_bitmask(batch, vocab)
    batcher = xgrammar.BatchGrammarMatcher(threads)
    rng = random.Random(0)
    while True:
        matchers = [xgrammar.GrammarMatcher(compiled) for _ in range(batch)]
        for _ in range(60):
            start = time.perf_counter()
            batcher.batch_fill_next_token_bitmask(matchers, bitmask)
            tokens = random_allowed(bitmask, vocab, tokenizer.eos_token_id, rng)
            xgrammar.BatchGrammarMatcher.batch_accept_token(matchers, tokens)
            time.sleep(max(0.0, period_ms / 1e3 - (time.perf_counter() - start)))


def contention(
    model: str, device: str, num_requests: int, output_len: int, threads: list[int],
    period_ms: float,
) -> None:  # fmt: skip
    """Unconstrained engine throughput alone and beside another process that fills 128
    grammar masks every `period_ms` on each of `threads` thread counts: what the grammar's
    threads cost the engine's thread through the machine's cores alone (no GIL shared)."""
    import multiprocessing

    from strata import LLM, SamplingParams

    path = model.removeprefix("random:")
    tokenizer_path = os.path.dirname(path) if path.endswith(".json") else path
    llm = LLM(None if model == "embedded" else model, device=device, overlap_scheduling="on")
    timer = PhaseTimer(llm)
    prompts = [f"Write order number {i} as JSON." for i in range(num_requests)]
    params = [
        SamplingParams(max_tokens=output_len, temperature=0.8, seed=i, ignore_eos=True)
        for i in range(num_requests)
    ]
    llm.generate(prompts[:8], params[:8])
    rows = []
    for n in [0, *threads, 0]:
        side = None
        if n:
            ctx = multiprocessing.get_context("spawn")
            side = ctx.Process(target=_side_fills, args=(tokenizer_path, 128, n, period_ms))
            side.start()
            time.sleep(8.0)  # its imports and compile
        first = len(timer.steps)
        start = time.perf_counter()
        outs = generate_unconstrained(llm, prompts, params)
        seconds = time.perf_counter() - start
        if side is not None:
            side.kill()
            side.join()
        tokens = sum(len(o.token_ids) for o in outs)
        title = f"beside fills on {n} threads" if n else "alone"
        timer.report(first, title)
        rows.append((title, tokens / seconds))
    print(f"unconstrained engine, {num_requests} requests x {output_len} tokens; the other "
          f"process fills 128 masks every {period_ms} ms")
    for title, rate in rows:
        print(f"  {title:<28} {rate:,.0f} output tokens/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("masks", help="xgrammar compile and mask times on this CPU")
    m.add_argument("--batch", type=int, default=64, help="matchers filled per step (default 64)")
    w = sub.add_parser("walks", help="accept + fill per step: a valid document vs random tokens")
    w.add_argument("--batch", type=int, default=128, help="matchers (default 128)")
    w.add_argument("--tokenizer", default=None, help="tokenizer folder (default: embedded)")
    w.add_argument("--steps", type=int, default=60, help="steps walked (default 60)")
    w.add_argument("--vocab", type=int, default=None, help="model vocabulary (default: tokenizer)")
    g = sub.add_parser("gil", help="a mask worker beside an engine thread running Python")
    g.add_argument("--batch", type=int, default=128, help="matchers (default 128)")
    g.add_argument("--host-ms", type=float, default=2.5, help="engine Python a step (2.5)")
    g.add_argument("--steps", type=int, default=40, help="document tokens walked (default 40)")
    e = sub.add_parser("engine", help="engine throughput, unconstrained vs half constrained")
    e.add_argument("--model", default="random:llama-3.2-1b", help="or 'embedded'")
    e.add_argument("--device", default="cuda")
    e.add_argument("--num-requests", type=int, default=256)
    e.add_argument("--output-len", type=int, default=256)
    e.add_argument(
        "--profile", action="store_true",
        help="print host profiles and (on CUDA) device kernel times of both runs",
    )
    e.add_argument(
        "--serial", action="store_true",
        help="no mask worker: every row is accepted and filled in the build, on the step's "
        "serial path (to tell the worker's contention from its work)",
    )
    e.add_argument(
        "--overlap", choices=("auto", "on", "off"), default="auto",
        help="the engine's overlap_scheduling (default auto: on on CUDA)",
    )
    e.add_argument(
        "--repeats", type=int, default=3,
        help="runs of each kind, alternating; medians reported (default 3: one unconstrained "
        "run lasts about a second on an H100, too short to time alone)",
    )
    e.add_argument(
        "--switch-interval", type=float, default=None, metavar="S",
        help="sys.setswitchinterval for the run (default: Python's, 0.005 s)",
    )
    e.add_argument(
        "--phases", action="store_true",
        help="print the host time of each part of an engine step (schedule, launch, masks, "
        "sampling, outputs), median per step, for both runs",
    )
    e.add_argument(
        "--fill-threads", type=int, default=0,
        help="threads of xgrammar's batch fill (default 0: xgrammar's own, half the cores)",
    )
    e.add_argument(
        "--accept-on-worker", action="store_true",
        help="the matchers accept each step's tokens on the mask worker too (default: on the "
        "engine's thread, before the worker fills)",
    )
    e.add_argument(
        "--sample-after-schedule", action="store_true",
        help="sample the launched step after scheduling the next (LLMEngine."
        "sample_after_schedule; default: before, the engine's default)",
    )
    e.add_argument(
        "--sync-debug", action="store_true",
        help="list where the host waits for the device in both runs "
        "(torch.cuda.set_sync_debug_mode('warn'); slows the runs)",
    )
    c = sub.add_parser("contention", help="engine throughput beside another process's fills")
    c.add_argument("--model", default="random:llama-3.2-1b", help="random:PATH/config.json "
                   "with its tokenizer beside it")
    c.add_argument("--device", default="cuda")
    c.add_argument("--num-requests", type=int, default=256)
    c.add_argument("--output-len", type=int, default=256)
    c.add_argument("--threads", default="1,4,8", help="fill threads to try (default 1,4,8)")
    c.add_argument("--period-ms", type=float, default=3.0, help="a fill every (default 3)")
    args = p.parse_args()
    if args.what == "contention":
        threads = [int(t) for t in args.threads.split(",")]
        contention(
            args.model, args.device, args.num_requests, args.output_len, threads, args.period_ms
        )
    elif args.what == "walks":
        walks(args.batch, args.tokenizer, args.steps, args.vocab)
    elif args.what == "masks":
        masks(args.batch)
    elif args.what == "gil":
        gil(args.batch, args.host_ms, args.steps)
    else:
        if args.switch_interval is not None:
            sys.setswitchinterval(args.switch_interval)
        engine(
            args.model, args.device, args.num_requests, args.output_len, args.profile,
            args.serial, args.overlap, args.repeats, args.phases, args.sync_debug,
            args.fill_threads, args.accept_on_worker, args.sample_after_schedule,
        )  # fmt: skip


if __name__ == "__main__":
    main()
