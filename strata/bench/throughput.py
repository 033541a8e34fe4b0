"""`strata bench throughput`: an offline workload through Strata and, optionally, through
HF transformers `generate` on the same model, device and requests, in one run."""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from strata.bench.workload import Workload, parse_range, random_workload
from strata.engine.llm import LLM
from strata.engine.sampling_params import SamplingParams
from strata.engine_flags import engine_keywords
from strata.flags import add_flags
from strata.options import flatten, option


@dataclass(frozen=True)
class ThroughputBenchOptions:
    """The flags of `strata bench throughput` beside the engine's and add_url_args'."""

    num_requests: int = field(default=64, metadata=option("requests (default 64)"))
    input_len: tuple[int, int] = field(default=(100, 1024), metadata=option(
        "prompt length range, uniform (default 100-1024)", metavar="LOW-HIGH", parse=parse_range
    ))  # fmt: skip
    output_len: tuple[int, int] = field(default=(100, 1024), metadata=option(
        "output length range, uniform; EOS is ignored (default 100-1024)",
        metavar="LOW-HIGH", parse=parse_range,
    ))  # fmt: skip
    concurrency: tuple[int, ...] = field(default=(256,), metadata=option(
        "requests in flight at once; several values run one after another (default 256)",
        metavar="N",
    ))  # fmt: skip
    compare_hf: bool = field(default=False, metadata=option(
        "also run HF transformers generate on the same model, device and requests, "
        "in batches of each --concurrency",
    ))  # fmt: skip
    json_path: str | None = field(default=None, metadata=option(
        "also write results as JSON", flag="--json", metavar="PATH"
    ))  # fmt: skip


def add_throughput_args(p: argparse.ArgumentParser) -> None:
    add_flags(p, flatten(ThroughputBenchOptions))


@dataclass(frozen=True)
class ThroughputResult:
    engine: str
    concurrency: int
    num_requests: int
    input_tokens: int
    output_tokens: int
    seconds: float

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.seconds

    @property
    def input_tokens_per_s(self) -> float:
        return self.input_tokens / self.seconds

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    def row(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "requests_per_s": self.requests_per_s,
            "input_tokens_per_s": self.input_tokens_per_s,
            "output_tokens_per_s": self.output_tokens_per_s,
        }


def run_strata(llm: LLM, workload: Workload, concurrency: int) -> ThroughputResult:
    """Closed loop: `concurrency` requests in flight; each finished one is replaced by the
    next, as by that many clients."""
    engine = llm.engine
    params = [
        SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in workload.output_lens
    ]
    queue = list(zip(workload.prompts, params, strict=True))[::-1]
    produced = finished = 0
    _sync(engine.device)
    start = time.perf_counter()
    with tqdm(total=len(params), desc=f"Strata (concurrency {concurrency})") as bar:
        in_flight = 0
        while queue or in_flight:
            while queue and in_flight < concurrency:
                seq = engine.prepare(*queue.pop())
                seq.final_only = True  # only finished outputs are read below
                engine.enqueue(seq)
                in_flight += 1
            for out in engine.step():
                if out.finished:
                    in_flight -= 1
                    finished += 1
                    produced += len(out.token_ids)
                    bar.update(1)
    _sync(engine.device)
    seconds = time.perf_counter() - start
    if produced != workload.num_output_tokens:
        raise RuntimeError(
            f"Strata produced {produced} tokens, expected {workload.num_output_tokens}"
        )
    return ThroughputResult(
        "strata", concurrency, finished, workload.num_input_tokens, produced, seconds
    )


def run_hf(
    hf_model: Any, workload: Workload, batch_size: int, device: torch.device
) -> ThroughputResult:
    """HF transformers `generate`, greedy, in fixed batches of `batch_size` (left-padded).

    A batch runs until its longest request is done; only the tokens each request asked
    for are counted, as a server would return them.
    """
    _sync(device)
    start = time.perf_counter()
    n = len(workload.prompts)
    for first in tqdm(range(0, n, batch_size), desc=f"HF generate (batch {batch_size})"):
        prompts = workload.prompts[first : first + batch_size]
        max_new = max(workload.output_lens[first : first + batch_size])
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        with torch.inference_mode():
            hf_model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new,
                min_new_tokens=max_new,
                do_sample=False,
                pad_token_id=0,
            )
    _sync(device)
    seconds = time.perf_counter() - start
    return ThroughputResult(
        "hf-transformers", batch_size, n, workload.num_input_tokens, workload.num_output_tokens,
        seconds,
    )  # fmt: skip


def load_hf_twin(llm: LLM) -> Any:
    """An HF transformers model with the Strata engine's config and weights, on the same
    device and in the same dtype."""
    from transformers import AutoModelForCausalLM

    engine = llm.engine
    hf_config = engine.model_config.hf_config
    model = AutoModelForCausalLM.from_config(hf_config, dtype=engine.dtype)
    missing, unexpected = model.load_state_dict(engine.loaded.model.hf_state_dict(), strict=False)
    if unexpected or any(not name.startswith("lm_head") for name in missing):
        raise RuntimeError(f"HF twin weights do not line up: {missing} {unexpected}")
    if engine.model_config.tie_word_embeddings:
        model.tie_weights()
    return model.to(engine.device).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_table(results: list[ThroughputResult], header: str) -> str:
    lines = [
        header,
        f"{'engine':<16} {'conc':>5} {'reqs':>5} {'in tok':>8} {'out tok':>8} {'time s':>8} "
        f"{'req/s':>7} {'in tok/s':>9} {'out tok/s':>9}",
    ]
    for r in results:
        lines.append(
            f"{r.engine:<16} {r.concurrency:>5} {r.num_requests:>5} {r.input_tokens:>8} "
            f"{r.output_tokens:>8} {r.seconds:>8.2f} {r.requests_per_s:>7.2f} "
            f"{r.input_tokens_per_s:>9.1f} {r.output_tokens_per_s:>9.1f}"
        )
    strata = {r.concurrency: r for r in results if r.engine == "strata"}
    for r in results:
        if r.engine != "strata" and r.concurrency in strata:
            ratio = strata[r.concurrency].output_tokens_per_s / r.output_tokens_per_s
            lines.append(f"strata / hf output tok/s at concurrency {r.concurrency}: {ratio:.2f}x")
    return "\n".join(lines)


def run(args: Any) -> list[ThroughputResult]:
    """Entry point of `strata bench throughput` (args from strata.cli): the offline engine,
    or with --url a running server over HTTP; both print the same table and JSON."""
    if getattr(args, "url", None):
        from strata.bench.http_throughput import run_http

        results, header = run_http(args)
    else:
        results, header = run_offline(args)
    print(format_table(results, header))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"header": header, "results": [r.row() for r in results]}, f, indent=2)
    return results


def run_offline(args: Any) -> tuple[list[ThroughputResult], str]:
    llm = LLM(**engine_keywords(args))
    engine = llm.engine
    workload = random_workload(
        args.num_requests, args.input_len, args.output_len, engine.model_config.vocab_size,
        args.seed,
    )  # fmt: skip
    warm = random_workload(2, (16, 16), (4, 4), engine.model_config.vocab_size, args.seed + 1)
    run_strata(llm, warm, 2)  # first-call costs stay out of the numbers
    results = []
    for concurrency in args.concurrency:
        results.append(run_strata(llm, workload, concurrency))
        engine.check_integrity()
    if args.compare_hf:
        hf_model = load_hf_twin(llm)
        run_hf(hf_model, warm, 2, engine.device)
        for concurrency in args.concurrency:
            results.append(run_hf(hf_model, workload, concurrency, engine.device))
    if engine.device.type == "cuda":
        device = torch.cuda.get_device_name(engine.device)
    else:
        cpu = platform.processor() or platform.machine()
        device = f"CPU ({cpu}, {torch.get_num_threads()} threads)"
    header = (
        f"model {engine.loaded.name} ({str(engine.dtype).removeprefix('torch.')}) on {device}; "
        f"{args.num_requests} requests, input {args.input_len[0]}-{args.input_len[1]}, "
        f"output {args.output_len[0]}-{args.output_len[1]} tokens, ignore_eos, seed {args.seed}"
    )
    return results, header
