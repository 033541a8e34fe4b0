"""Soak test: drive a `strata serve` started on loopback with well-formed and hostile
requests, for a bounded time and request count, then check that nothing leaked.

    python3 scripts/soak.py --duration 60 [--model PATH] [--json OUT.json] [-- serve args]

Well-formed requests (greedy completions and chats, streaming, n > 1, long prompts, KV
policies, repeated prompts that hit the prefix cache and tiers) must complete; greedy
ones must equal a solo run of the same request. Hostile requests (out-of-range values,
bools as token ids, lone surrogates, too many stop strings or choices, oversized and
random bodies, a missing key) must get a 4xx. Streams cut mid-way must be aborted.
The requests are in scripts/soak_cases.py.

The warm-up, before the memory baseline: the solo references, one at a time; prompts of
random token ids that fill the GPU pool twice over, so the references' blocks live on only
in the tiers (if any); every greedy prompt again (loaded from a tier, equal to its
reference); every case once alone; then every client thread runs every case once, all at
the same time. So every case is exercised however slow the machine. Then the load: random
cases until --duration (or --load-until) ends. Afterwards: no request running or waiting,
every KV block free, no tier block found corrupt or failed, and the server's RSS within
10% of what it was after the warm-up. Exits 1 on any failure; prints the counts (and
writes them as JSON with --json).
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import httpx
from soak_cases import GREEDY_PROMPTS, KEY, MAX_BODY, Case, all_cases, solo_text

HEADERS = {"Authorization": f"Bearer {KEY}"}
RSS_GROWTH_LIMIT = 0.10
BLOCK_SIZE = 16  # `strata serve`'s default; a larger one only makes the warm-up fill less
FILLER_TOKENS = 512  # fits any --max-model-len of 1024 or more


def _start(args: argparse.Namespace, port: int, log: IO[bytes] | None) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "strata.cli", "serve", "--port", str(port),
           "--served-model-name", "soak", "--api-key", KEY, "--public-metrics",
           "--max-request-bytes", str(MAX_BODY), "--device", args.device]  # fmt: skip
    if args.model:
        cmd += ["--model", args.model]
    target = log if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen(cmd + args.serve_args, stdout=target, stderr=target)
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit("strata serve exited before it was ready")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("strata serve did not become healthy")


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    pairs = (line.split() for line in text.splitlines() if line and not line.startswith("#"))
    return {p[0]: float(p[1]) for p in pairs if len(p) == 2}


def _idle(url: str, timeout_s: float) -> dict[str, float]:
    """The metrics once nothing runs or waits and every block is free (or at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = _metrics(url)
        busy = m["strata_num_requests_running"] + m["strata_num_requests_waiting"]
        if (busy == 0 and m["strata_kv_blocks_free"] == m["strata_kv_blocks_total"]) or (
            time.monotonic() > deadline
        ):
            return m
        time.sleep(0.2)


def _warm_up(url: str) -> tuple[dict[str, str], Counter[str]]:
    """One request at a time: the solo references; then prompts of random token ids that
    fill the GPU pool twice over, so the references' blocks survive only in the tiers (if
    any); then every greedy prompt again, loaded from the tiers and equal to its reference;
    then every case once."""
    rng, counts = random.Random(-1), Counter[str]()
    with httpx.Client(base_url=url, headers=HEADERS, timeout=300) as client:
        solo = {prompt: solo_text(client, prompt) for prompt in GREEDY_PROMPTS}
        pool_tokens = int(_metrics(url)["strata_kv_blocks_total"]) * BLOCK_SIZE
        for _ in range(2 * pool_tokens // FILLER_TOKENS + 1):
            ids = [rng.randrange(1000, 20_000) for _ in range(FILLER_TOKENS)]
            r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 1})
            counts["ok filler" if r.status_code == 200 else f"FAIL filler {r.status_code}"] += 1
        for prompt in GREEDY_PROMPTS:
            same = solo_text(client, prompt) == solo[prompt]
            counts["ok greedy" if same else "FAIL greedy after eviction differs from solo"] += 1
        for case in all_cases(solo):
            counts[case(client, rng)] += 1
    return solo, counts


def _load(
    url: str, cases: list[Case], args: argparse.Namespace, until: float | None
) -> Counter[str]:
    """Client threads at once. Without `until` (a time.monotonic() deadline) each runs every
    case once, starting at a different one; with it, random cases until then."""

    def worker(seed: int) -> Counter[str]:
        rng, mine = random.Random(seed), Counter[str]()
        with httpx.Client(base_url=url, headers=HEADERS, timeout=args.request_timeout) as c:
            if until is None:
                for case in cases[seed % len(cases) :] + cases[: seed % len(cases)]:
                    mine[case(c, rng)] += 1
            while until is not None and time.monotonic() < until:
                mine[rng.choice(cases)(c, rng)] += 1
                if sum(mine.values()) >= args.max_requests:
                    break
        return mine

    counts: Counter[str] = Counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        for result in pool.map(worker, range(args.concurrency)):
            counts += result
    return counts


def _load_seconds(args: argparse.Namespace) -> float:
    if args.load_until is None:
        return float(args.duration)
    return max(0.0, min(args.duration, args.load_until - time.time()))


def _soak(args: argparse.Namespace, log: IO[bytes] | None) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = _start(args, port, log)
    try:
        solo, counts = _warm_up(url)
        cases = all_cases(solo)
        counts += _load(url, cases, args, None)  # the warm-up's concurrent round
        rss_start = _rss_mib(proc.pid)
        began = time.monotonic()
        counts += _load(url, cases, args, began + _load_seconds(args))
        load_s = time.monotonic() - began
        after = _idle(url, args.idle_timeout)
        rss_end = _rss_mib(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return _summary(counts, after, (rss_start, rss_end), load_s)


def _tier_counts(m: dict[str, float]) -> dict[str, float]:
    tiers = {"prefix cache hit tokens": m.get("strata_prefix_cache_hits_total", 0.0),
             "tier hit tokens": m.get("strata_prefix_cache_tier_hits_total", 0.0)}  # fmt: skip
    for name, value in sorted(m.items()):
        if name.startswith("strata_kv_tier_") and '{tier="' in name:
            metric, label = name[len("strata_kv_tier_") :].split('{tier="')
            if metric in ("hits_total", "misses_total", "corrupt_total", "errors_total"):
                tier = label.split('"')[0]
                tiers[f"{tier} tier {metric[: -len('_total')]}"] = value
    return tiers


def _summary(
    counts: Counter[str], m: dict[str, float], rss: tuple[float, float], load_s: float
) -> dict[str, Any]:
    leaks = {
        "requests running": m["strata_num_requests_running"],
        "requests waiting": m["strata_num_requests_waiting"],
        "KV blocks held": m["strata_kv_blocks_total"] - m["strata_kv_blocks_free"],
    }
    if "strata_recall_host_bytes_used" in m:
        leaks["recall host bytes held"] = m["strata_recall_host_bytes_used"]
    tiers = _tier_counts(m)
    bad_blocks = sum(v for k, v in tiers.items() if k.endswith(("corrupt", "errors")))
    failures = sum(n for name, n in counts.items() if name.startswith("FAIL"))
    growth = rss[1] / rss[0] - 1
    rss_mib = {"start": round(rss[0], 1), "end": round(rss[1], 1), "growth": round(growth, 4)}
    clean = not any(leaks.values()) and not bad_blocks and growth <= RSS_GROWTH_LIMIT
    return {
        "pass": clean and not failures,
        "load_seconds": round(load_s, 1),
        "requests": sum(counts.values()),
        "well_formed_ok": sum(n for name, n in counts.items() if name.startswith("ok ")),
        "hostile_rejected": counts["rejected"],
        "disconnected": counts["disconnected"],
        "failures": failures,
        "outcomes": dict(sorted(counts.items())),
        "after": leaks,
        "tiers": tiers,
        "rss_mib": rss_mib,
    }


def _print_table(s: dict[str, Any]) -> None:
    print(f"| outcome | count |\n|---|---|\n| load seconds | {s['load_seconds']} |")
    for name, n in s["outcomes"].items():
        print(f"| {name} | {n} |")
    for key in ("well_formed_ok", "hostile_rejected", "disconnected", "failures"):
        print(f"| total: {key.replace('_', ' ')} | {s[key]} |")
    for name, value in s["after"].items():
        print(f"| after: {name} | {value:g} |")
    for name, value in s["tiers"].items():
        print(f"| {name} | {value:g} |")
    rss = s["rss_mib"]
    print(f"| after: server RSS | {rss['start']:.0f} -> {rss['end']:.0f} MiB "
          f"({rss['growth']:+.1%}) |")  # fmt: skip
    print("PASS" if s["pass"] else "FAIL")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model", default=None, help="model to serve (default: the embedded one)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--load-until", type=float, default=None, metavar="UNIX_TIME",
                   help="end the load by this time even if --duration is longer")  # fmt: skip
    p.add_argument("--max-requests", type=int, default=10_000, help="per worker")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds to be healthy")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--idle-timeout", type=float, default=60.0,
                   help="seconds after the load for the server to become idle")  # fmt: skip
    p.add_argument("--json", type=Path, default=None, help="also write the counts here")
    p.add_argument("--server-log", type=Path, default=None, help="the server's output")
    p.add_argument("serve_args", nargs="*", help="extra `strata serve` arguments, after --")
    return p.parse_args()


def main() -> int:
    args = _args()
    if args.server_log is None:
        summary = _soak(args, None)
    else:
        with args.server_log.open("wb") as log:
            summary = _soak(args, log)
    _print_table(summary)
    if args.json is not None:
        args.json.write_text(json.dumps({**summary, "argv": sys.argv[1:]}, indent=1) + "\n")
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
