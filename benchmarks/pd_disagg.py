"""Prefill/decode disaggregation against co-located replicas (issue 24), on CPU, measured
as DistServe does: TTFT, TPOT, and goodput at an SLO.

    python3 benchmarks/pd_disagg.py [--rates 0.1,0.2,0.3] [--requests 16]
        [--prompt-tokens 512] [--max-tokens 32] [--slos 4:0.25,8:0.12]
        [--systems colocated,disagg] [--worker-niceness 0]

Each system is a `strata serve` of the embedded model (float32) on a local Ray cluster,
every replica one CPU at nice --worker-niceness (Ray's own default, 15, lets any other job
on the machine starve the replicas): colocated is `--replicas 2`; disagg is
`--prefill-replicas 1 --decode-replicas 1 --kv-remote URL` (a redis-server/valkey-server
started here on a free loopback port). Requests are /v1/completions of unique random
token-id prompts (no prefix is shared, so no cache helps either system), `--max-tokens`
output tokens each (ignore_eos), streamed, arriving as a Poisson process of the given
rate (seeded: both systems see the same arrival times and prompts). Per request: TTFT
(send to first token at the client) and TPOT ((last token - first token) / (tokens - 1)).
A request meets an SLO "T:P" when TTFT <= T s and TPOT <= P s; attainment is the
fraction that does, and goodput is the highest rate tried with attainment >=
--attainment (DistServe's 90%). Several SLOs are scored on the same runs: which system
wins depends on which of TTFT and TPOT the SLO holds tight. The last column is the
machine's 1-minute load average when the rate's run ended (other jobs show there).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from strata.bench.server_process import wait_healthy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SYSTEMS = {
    "colocated": ["--replicas", "2"],
    "disagg": ["--prefill-replicas", "1", "--decode-replicas", "1"],
}


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 40000) for _ in range(length)] for _ in range(n)]


def arrivals(n: int, rate: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def one(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "return_token_ids": True, "temperature": 0}  # fmt: skip
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            n = sum(len(c.get("token_ids") or ()) for c in json.loads(line[6:])["choices"])
            if n:
                last = time.perf_counter()
                first = first or last
                tokens += n
    assert first is not None and last is not None and tokens == max_tokens, "a request failed"
    return {"ttft": first - start, "tpot": (last - first) / max(1, tokens - 1)}


async def run_rate(url: str, work: list[list[int]], at: list[float], max_tokens: int) -> list:
    async with httpx.AsyncClient(timeout=900) as client:
        start = time.perf_counter()

        async def timed(prompt: list[int], t: float) -> dict:
            await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
            return await one(client, url, prompt, max_tokens)

        return list(await asyncio.gather(*(timed(p, t) for p, t in zip(work, at, strict=True))))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def slos(args: argparse.Namespace) -> list[tuple[float, float]]:
    pairs = [s.split(":") for s in args.slos.split(",")]
    return [(float(t), float(p)) for t, p in pairs]


def start_server(args: argparse.Namespace, system: str, redis_url: str) -> subprocess.Popen:
    remote = ["--kv-remote", redis_url] if system == "disagg" else []
    command = [
        sys.executable, "-m", "strata.cli", "serve", *SYSTEMS[system], *remote,
        "--port", str(args.port), "--replica-cpus", "1", "--log-level", "WARNING",
        "--max-model-len", str(args.prompt_tokens + args.max_tokens + 16),
    ]  # fmt: skip
    # Ray starts its workers (the replicas) at nice 15 unless told otherwise: on a machine
    # shared with other jobs they would get only the CPU those leave over.
    env = {**os.environ, "RAY_worker_niceness": str(args.worker_niceness)}
    server = subprocess.Popen(command, start_new_session=True, env=env)
    wait_healthy(server, args.port)
    return server


def run_system(args: argparse.Namespace, system: str, redis_url: str) -> list[dict]:
    server = start_server(args, system, redis_url)
    url = f"http://127.0.0.1:{args.port}"
    rows = []
    try:
        warm = prompts(4, args.prompt_tokens, seed=999)
        asyncio.run(run_rate(url, warm, [0.0] * len(warm), args.max_tokens))
        lone = asyncio.run(run_rate(url, prompts(1, args.prompt_tokens, 998), [0.0], 32))[0]
        print(f"# {system}: lone request TTFT {lone['ttft']:.3f} s, TPOT {lone['tpot']:.4f} s",
              flush=True)  # fmt: skip
        for i, rate in enumerate(float(r) for r in args.rates.split(",")):
            work = prompts(args.requests, args.prompt_tokens, seed=i)
            at = arrivals(args.requests, rate, seed=i)
            results = asyncio.run(run_rate(url, work, at, args.max_tokens))
            ttft, tpot = [r["ttft"] for r in results], [r["tpot"] for r in results]
            attain = [sum(r["ttft"] <= t and r["tpot"] <= p for r in results) / len(results)
                      for t, p in slos(args)]  # fmt: skip
            rows.append({"system": system, "rate": rate, "ttft50": pct(ttft, 0.5),
                         "ttft90": pct(ttft, 0.9), "tpot50": pct(tpot, 0.5),
                         "tpot90": pct(tpot, 0.9), "attain": attain})  # fmt: skip
            r = rows[-1]
            print(f"| {system} | {rate:.2f} | {r['ttft50']:.2f} | {r['ttft90']:.2f} | "
                  f"{r['tpot50'] * 1e3:.0f} | {r['tpot90'] * 1e3:.0f} | "
                  f"{' | '.join(f'{a:.2f}' for a in attain)} | {os.getloadavg()[0]:.1f} |",
                  flush=True)  # fmt: skip
        metrics = httpx.get(f"{url}/metrics").text
        for line in metrics.splitlines():
            if line.startswith("strata_prefill_requests_total"):
                print(f"#   {line}")
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=120)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--systems", default="colocated,disagg")
    p.add_argument("--rates", default="0.1,0.2,0.3")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--slos", default="4:0.25,8:0.12", help="TTFT s:TPOT s, comma-separated")
    p.add_argument("--attainment", type=float, default=0.9)
    p.add_argument("--port", type=int, default=8139)
    p.add_argument("--worker-niceness", type=int, default=0, help="the replicas' nice value "
                   "(RAY_worker_niceness; Ray's own default is 15)")
    args = p.parse_args()
    from tests.redis_server import RedisServer

    redis = RedisServer(Path(tempfile.mkdtemp(prefix="strata-pd-")), maxmemory="2gb")
    redis.start()
    print(f"# {platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"embedded SmolLM2-135M float32, one CPU per replica; {args.requests} requests per "
          f"rate, {args.prompt_tokens}-token prompts, {args.max_tokens} output tokens")
    names = [f"attainment TTFT<={t:g}s TPOT<={p * 1e3:g}ms" for t, p in slos(args)]
    print("| system | rate (req/s) | TTFT p50 (s) | TTFT p90 (s) | TPOT p50 (ms) | "
          f"TPOT p90 (ms) | {' | '.join(names)} | load avg |")
    print("|---" * (7 + len(names)) + "|")
    try:
        rows: list[dict[str, Any]] = []
        for system in args.systems.split(","):
            rows += run_system(args, system, redis.url)
    finally:
        redis.stop()
    for i, name in enumerate(names):
        for system in args.systems.split(","):
            ok = [r["rate"] for r in rows
                  if r["system"] == system and r["attain"][i] >= args.attainment]  # fmt: skip
            print(f"# goodput ({name} for >= {args.attainment:.0%}) {system}: "
                  f"{max(ok) if ok else 0:.2f} req/s (highest rate tried)")


if __name__ == "__main__":
    main()
