"""`strata bench throughput --url`: the offline throughput workload, replayed over HTTP
against any OpenAI-compatible server (Strata, vLLM) as a closed loop.

The prompts are `random_workload`'s for the same --seed, lengths and --vocab-size, so
with the model's vocabulary size they are token for token the offline run's prompts.
Each of `concurrency` clients sends its next streaming request when its last one ends.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from tqdm.auto import tqdm

from strata.bench.client import (
    BenchmarkError,
    BenchRequest,
    ClientSet,
    RequestRecord,
    ServerTarget,
    http_client,
    send_request,
    served_model,
)
from strata.bench.requests import DEFAULT_VOCAB_SIZE, bench_requests
from strata.bench.throughput import ThroughputResult

REQUEST_TIMEOUT_S = 3600.0


def add_url_args(p: argparse.ArgumentParser) -> None:
    """The flags that point `strata bench throughput` at a server."""
    g = p.add_argument_group("against a running server (instead of the offline engine)")
    g.add_argument(
        "--url", default=None,
        help="root URL of an OpenAI-compatible server (e.g. http://127.0.0.1:8000): send the "
        "workload to its /v1/completions as token-id prompts, streaming, with ignore_eos. "
        "--model is then the model name sent (default: the first /v1/models lists); the "
        "engine flags are ignored",
    )  # fmt: skip
    g.add_argument("--api-key", default=None, help="with --url: 'Authorization: Bearer KEY'")
    g.add_argument(
        "--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, metavar="V",
        help="with --url: token ids are drawn from [100, V); give the model's vocabulary "
        f"size to send exactly the offline run's prompts (default {DEFAULT_VOCAB_SIZE})",
    )  # fmt: skip


def run_http(args: argparse.Namespace) -> tuple[list[ThroughputResult], str]:
    """One closed-loop run per --concurrency; returns the results and a header line."""
    if args.compare_hf:
        raise ValueError("--compare-hf runs HF transformers offline; it cannot go with --url")
    if args.vocab_size <= 100:
        raise ValueError(f"--vocab-size must be > 100, got {args.vocab_size}")
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> tuple[list[ThroughputResult], str]:
    requests = bench_requests(
        args.num_requests, args.input_len, args.output_len, "token-ids", args.seed,
        args.vocab_size,
    )  # fmt: skip
    warm = bench_requests(2, (16, 16), (4, 4), "token-ids", args.seed + 1, args.vocab_size)
    expected_output = sum(r.output_len for r in requests)
    async with http_client(1, REQUEST_TIMEOUT_S) as client:
        model = args.model or await served_model(client, args.url, args.api_key)
    target = ServerTarget(args.url, model, "completions", args.api_key)
    await closed_loop(target, warm, 2)  # first-request costs stay out
    results = []
    for concurrency in args.concurrency:
        records, seconds = await closed_loop(target, requests, concurrency)
        bad = [r for r in records if r.outcome != "ok"]
        if bad:
            raise BenchmarkError(
                f"{len(bad)} of {len(records)} requests to {target.route} failed or were "
                f"lost; first: {bad[0].outcome}: {bad[0].error}"
            )
        produced = sum(r.output_tokens or 0 for r in records)
        if produced != expected_output:
            raise BenchmarkError(
                f"the server produced {produced} tokens, expected {expected_output}"
            )
        prompt_tokens = sum(r.input_tokens or 0 for r in records)
        results.append(
            ThroughputResult("server", concurrency, len(records), prompt_tokens, produced, seconds)
        )
    header = (
        f"server {args.url} model {model} (/v1/completions, streaming); {args.num_requests} "
        f"requests, input {args.input_len[0]}-{args.input_len[1]}, output "
        f"{args.output_len[0]}-{args.output_len[1]} tokens, ignore_eos, seed {args.seed}, "
        f"vocab {args.vocab_size}"
    )
    return results, header


async def closed_loop(
    target: ServerTarget, requests: list[BenchRequest], concurrency: int
) -> tuple[list[RequestRecord], float]:
    """`concurrency` clients take the next request as each finishes; returns the records
    (in completion order) and the wall seconds of the whole loop. Each client has an HTTP
    client of its own (ClientSet: one connection each, built before the clock starts)."""
    if concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {concurrency}")
    pending = iter(requests)  # shared: the event loop hands each request to one client
    records: list[RequestRecord] = []
    loops = min(concurrency, len(requests))
    async with ClientSet(REQUEST_TIMEOUT_S) as clients:
        clients.reserve(loops)
        with tqdm(total=len(requests), desc=f"server (concurrency {concurrency})") as bar:
            start = time.perf_counter()

            async def client_loop() -> None:
                async with clients.client() as client:
                    for request in pending:
                        records.append(await send_request(client, target, request, start))
                        bar.update(1)

            await asyncio.gather(*(client_loop() for _ in range(loops)))
            seconds = time.perf_counter() - start
    return records, seconds
