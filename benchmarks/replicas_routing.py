"""KV-aware against round-robin routing over replicas on Ray Serve (issue 24), on CPU.

    python benchmarks/replicas_routing.py [--replicas 2] [--systems 4] [--users 10]
        [--server-args '--kv-cache-memory 0.07']

For each router, starts `strata serve --replicas N --router R` (the embedded model by
default, a local Ray cluster, one CPU per replica) and sends a shared-prefix workload:
every (system prompt, user) pair once, in a fixed shuffled order, `--concurrency` at a
time, streamed. Prints per router: prefix hit rate (cached / prompt tokens, from each
response's usage), mean and p99 time to first token, requests/s and output tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx

from strata.bench.server_process import wait_healthy

TOPICS = [
    "a bakery", "a bicycle repair shop", "a public library", "a train operator",
    "a dental clinic", "a garden centre", "a museum of clocks", "a ferry company",
]  # fmt: skip


def system_prompt(k: int) -> str:
    """A long system prompt (about 250 tokens), distinct per k from its first words."""
    rules = " ".join(f"Rule {i}: answer questions about {TOPICS[k % len(TOPICS)]} politely, "
                     f"briefly and only with facts you were given." for i in range(12))  # fmt: skip
    return f"You are the assistant of {TOPICS[k % len(TOPICS)]} (desk {k}). {rules}"


def workload(systems: int, users: int, seed: int) -> list[list[dict[str, str]]]:
    pairs = [(s, u) for s in range(systems) for u in range(users)]
    random.Random(seed).shuffle(pairs)
    return [[{"role": "system", "content": system_prompt(s)},
             {"role": "user", "content": f"I am customer {u}. When are you open on day {u}?"}]
            for s, u in pairs]  # fmt: skip


async def one(client: httpx.AsyncClient, url: str, messages: Any, max_tokens: int) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    ttft, usage, replica = None, None, None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        replica = response.headers.get("x-strata-replica")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if ttft is None and any(c["delta"].get("content") for c in chunk["choices"]):
                ttft = time.perf_counter() - start
            usage = chunk.get("usage") or usage
    assert usage is not None and ttft is not None, "a request failed"
    return {"ttft": ttft, "usage": usage, "replica": replica}


async def run_load(url: str, requests: list[Any], concurrency: int, max_tokens: int) -> dict:
    gate = asyncio.Semaphore(concurrency)

    async def limited(client: httpx.AsyncClient, messages: Any) -> dict:
        async with gate:
            return await one(client, url, messages, max_tokens)

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(limited(client, m) for m in requests))
        wall = time.perf_counter() - start
    return summarize(results, wall)


def summarize(results: list[dict], wall: float) -> dict:
    ttfts = sorted(r["ttft"] for r in results)
    prompt = sum(r["usage"]["prompt_tokens"] for r in results)
    cached = sum(r["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
                 for r in results)  # fmt: skip
    output = sum(r["usage"]["completion_tokens"] for r in results)
    per_replica = {}
    for r in results:
        per_replica[r["replica"]] = per_replica.get(r["replica"], 0) + 1
    return {
        "requests": len(results), "hit_rate": cached / prompt, "prompt_tokens": prompt,
        "ttft_mean_s": statistics.mean(ttfts),
        "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        "req_per_s": len(results) / wall, "out_tok_per_s": output / wall, "wall_s": wall,
        "per_replica": dict(sorted(per_replica.items())),
        "ttfts_s": [r["ttft"] for r in results],  # in request order, for the simulator
        "replicas": [r["replica"] for r in results],
        "cached_tokens": [r["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
                          for r in results],
        "prompt_tokens_each": [r["usage"]["prompt_tokens"] for r in results],
    }  # fmt: skip


def start_server(args: argparse.Namespace, router: str, port: int) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "strata.cli", "serve", "--replicas", str(args.replicas),
        "--router", router, "--port", str(port), "--replica-cpus", str(args.replica_cpus),
        "--log-level", "WARNING", *([] if args.model is None else ["--model", args.model]),
        *args.server_args.split(),
    ]  # fmt: skip
    server = subprocess.Popen(command, start_new_session=True)
    wait_healthy(server, port)
    return server


def warm_every_replica(url: str, args: argparse.Namespace, each: int = 3) -> None:
    """Short requests (sharing no prefix with the run) until every replica has answered
    `each` of them, whatever the router: a replica's first steps are slow on CPU, and a
    router that favours one replica while idle would otherwise leave another cold."""
    served: dict[str, int] = {}
    for batch in range(20):
        warm = [[{"role": "user", "content": f"Hello {batch} {i}"}]
                for i in range(2 * args.replicas)]  # fmt: skip
        for replica in asyncio.run(run_load(url, warm, args.concurrency, 2))["replicas"]:
            served[replica] = served.get(replica, 0) + 1
        if len(served) == args.replicas and min(served.values()) >= each:
            return
    raise RuntimeError(f"warm-up reached only {served} of {args.replicas} replicas")


def run_router(args: argparse.Namespace, router: str, requests: list[Any]) -> dict:
    port = args.port
    server = start_server(args, router, port)
    try:
        url = f"http://127.0.0.1:{port}"
        warm_every_replica(url, args)
        # Alone on an idle cluster: the fixed cost of a request outside the engine's steps
        # (HTTP, front, Ray hops, tokenizing), for the simulator (strata/sim).
        probes = [[{"role": "user", "content": f"Hi {i}"}] for i in range(args.probes)]
        probe = asyncio.run(run_load(url, probes, 1, 4)) if probes else None
        result = asyncio.run(run_load(url, requests, args.concurrency, args.max_tokens))
        metrics = httpx.get(f"{url}/metrics").text
        result["probe_ttfts_s"] = [] if probe is None else probe["ttfts_s"]
        result["probe_replicas"] = [] if probe is None else probe["replicas"]
        result["decisions"] = [line for line in metrics.splitlines()
                               if line.startswith("strata_router_decisions_total")]  # fmt: skip
        return result
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--replica-cpus", type=float, default=1.0)
    p.add_argument("--systems", type=int, default=4)
    p.add_argument("--users", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--routers", default="kv-aware,round-robin")
    p.add_argument("--port", type=int, default=8137)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write every router's result here")
    p.add_argument("--probes", type=int, default=0, help="before the load, time this many "
                   "short requests sent one at a time (max_tokens 4): the per-request cost "
                   "outside the engine's steps, for the simulator")
    p.add_argument("--server-args", default="", help="more `strata serve` flags, e.g. "
                   "'--kv-cache-memory 0.07' (a pool too small for every system prompt)")
    args = p.parse_args()
    requests = workload(args.systems, args.users, args.seed)
    print(f"# {platform.node()}: {os.cpu_count()} CPUs, {platform.python_version()}; "
          f"{args.replicas} replicas x {args.replica_cpus} CPU, model "
          f"{args.model or 'embedded SmolLM2-135M'}; {args.systems} system prompts x "
          f"{args.users} users, concurrency {args.concurrency}, {args.max_tokens} output "
          f"tokens; server args {args.server_args!r}")  # fmt: skip
    results = {}
    print("| router | hit rate | TTFT mean (s) | TTFT p99 (s) | req/s | out tok/s | per replica |")
    print("|---|---|---|---|---|---|---|")
    for router in args.routers.split(","):
        r = results[router] = run_router(args, router, requests)
        print(f"| {router} | {r['hit_rate']:.3f} | {r['ttft_mean_s']:.3f} | "
              f"{r['ttft_p99_s']:.3f} | {r['req_per_s']:.2f} | {r['out_tok_per_s']:.1f} | "
              f"{r['per_replica']} |", flush=True)  # fmt: skip
        for line in r["decisions"]:
            print(f"#   {line}")
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
