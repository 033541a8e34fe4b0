"""`strata bench throughput --url`: the offline throughput workload, replayed over HTTP
against any OpenAI-compatible server (Strata, vLLM) as a closed loop.

The prompts are `random_workload`'s for the same --seed, lengths and --vocab-size, so
with the model's vocabulary size they are token for token the offline run's prompts.
Each of `concurrency` clients sends its next streaming request when its last one ends:
the open loop of `strata bench serve` with every request due at once and `concurrency`
slots, so `--client-processes` spreads it over processes the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from tqdm.auto import tqdm

from strata.bench.client import (
    BenchmarkError,
    BenchRequest,
    ClientSet,
    RequestRecord,
    ServerTarget,
    http_client,
    served_model,
)
from strata.bench.client_load import ClientLoad
from strata.bench.client_pool import ClientPool, send_all
from strata.bench.requests import DEFAULT_VOCAB_SIZE, bench_requests
from strata.bench.throughput import ThroughputResult

logger = logging.getLogger("strata.bench")

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
        "--client-processes", type=int, default=1, metavar="N",
        help="with --url: send the requests from N processes, each with its own event loop "
        "and a share of every --concurrency; the report says when one loop lagged "
        "(default 1)",
    )  # fmt: skip
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
    if args.client_processes < 1:
        raise ValueError(f"--client-processes must be >= 1, got {args.client_processes}")
    if min(args.concurrency) < 1:
        raise ValueError(f"--concurrency must be >= 1, got {min(args.concurrency)}")
    if min(args.concurrency) < args.client_processes:
        raise ValueError(
            f"--concurrency {min(args.concurrency)} is split over the client processes: each "
            f"value must be >= --client-processes ({args.client_processes})"
        )
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
    results, lagged = [], []
    async with ClientSet(REQUEST_TIMEOUT_S) as clients:
        await closed_loop(clients, None, target, warm, 2)  # first-request costs stay out
        for concurrency in args.concurrency:
            pool = None
            if args.client_processes > 1:  # a pool per concurrency: the caps are split
                pool = ClientPool(args.client_processes, target, concurrency, REQUEST_TIMEOUT_S)
            try:
                records, seconds, load = await closed_loop(
                    clients, pool, target, requests, concurrency
                )
            finally:
                if pool is not None:
                    pool.close()
            if load.lagged:
                lagged.append(f"concurrency {concurrency}: {load.describe()}")
            results.append(
                _result(target, concurrency, records, seconds, expected_output)
            )
    for line in lagged:
        logger.warning("the client lagged at %s", line)
    header = (
        f"server {args.url} model {model} (/v1/completions, streaming); {args.num_requests} "
        f"requests, input {args.input_len[0]}-{args.input_len[1]}, output "
        f"{args.output_len[0]}-{args.output_len[1]} tokens, ignore_eos, seed {args.seed}, "
        f"vocab {args.vocab_size}, {args.client_processes} client process(es)"
    )
    return results, header


def _result(
    target: ServerTarget,
    concurrency: int,
    records: list[RequestRecord],
    seconds: float,
    expected_output: int,
) -> ThroughputResult:
    """The run's row; raises BenchmarkError if any request failed or tokens are missing."""
    bad = [r for r in records if r.outcome != "ok"]
    if bad:
        raise BenchmarkError(
            f"{len(bad)} of {len(records)} requests to {target.route} failed or were "
            f"lost; first: {bad[0].outcome}: {bad[0].error}"
        )
    produced = sum(r.output_tokens or 0 for r in records)
    if produced != expected_output:
        raise BenchmarkError(f"the server produced {produced} tokens, expected {expected_output}")
    prompt_tokens = sum(r.input_tokens or 0 for r in records)
    return ThroughputResult("server", concurrency, len(records), prompt_tokens, produced, seconds)


async def closed_loop(
    clients: ClientSet,
    pool: ClientPool | None,
    target: ServerTarget,
    requests: list[BenchRequest],
    concurrency: int,
) -> tuple[list[RequestRecord], float, ClientLoad]:
    """`concurrency` clients take the next request as each finishes (from this process,
    or from the pool's, which split `concurrency`); returns the records in request order,
    the wall seconds of the whole loop, and the client's load."""
    with tqdm(total=len(requests), desc=f"server (concurrency {concurrency})") as bar:
        return await send_all(
            clients, pool, target, requests, [0.0] * len(requests), concurrency,
            lambda done: bar.update(done - bar.n),
        )
