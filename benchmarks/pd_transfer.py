"""Where a prompt's KV should travel from a prefill replica to a decode replica: through
the shared remote tier (Valkey/Redis) or Ray's object store (issue 24), on CPU.

    python3 benchmarks/pd_transfer.py [--blocks 32,128] [--repeats 5]
        [--redis-url redis://127.0.0.1:6399/0]

A writer and a reader Ray actor (one CPU each, as two replicas) move the same blocks of
the embedded SmolLM2-135M's shape (30 layers, 3 KV heads, head dim 64, 16 tokens,
float32: 720 KiB a block), so 32 blocks are a 512-token prompt's KV:
- tier: the writer runs `RemoteTier.put` (the path a prefill replica's write-through
  takes: the writer process, header, checksum, SET NX); the reader runs `contains`
  (the decode replica's probe) and `get_into` the rows of a slab (its read into cpu-tier
  slots, verified). Each repeat uses new keys.
- ray: the writer `ray.put`s the blocks (one uint8 tensor); the reader `ray.get`s the
  reference and copies the rows into its slab (the same destination as the tier's).
Prints the median over repeats of each side's time, in the actor that did it. Without
--redis-url a redis-server/valkey-server is started on a free loopback port.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from strata.kv.tiers.base import BlockLayout, StoredBlock

LAYOUT = BlockLayout("cd" * 32, 30, 3, 64, 16, "float32")


def _blocks(n: int, seed: int) -> list[StoredBlock]:
    slab = torch.randint(0, 256, (n, LAYOUT.nbytes), dtype=torch.uint8)
    return [StoredBlock(f"{seed}:{i}".encode().ljust(32, b"."), tuple(range(16)), slab[i])
            for i in range(n)]  # fmt: skip


class Side:
    """One replica's half of a transfer; its methods return (seconds, result)."""

    def __init__(self, url: str) -> None:
        from strata.kv.tiers.remote import RemoteTier

        torch.set_num_threads(1)
        self.tier = RemoteTier(LAYOUT, url, timeout_s=10.0)
        self.tier.put(_blocks(1, -1))  # starts the writer process

    def tier_write(self, n: int, seed: int) -> tuple[float, None]:
        blocks = _blocks(n, seed)
        start = time.perf_counter()
        self.tier.put(blocks)
        return time.perf_counter() - start, None

    def tier_read(self, n: int, seed: int) -> tuple[float, None]:
        keys = [b.key for b in _blocks(n, seed)]
        slab = torch.empty((n, LAYOUT.nbytes), dtype=torch.uint8)
        start = time.perf_counter()
        assert all(self.tier.contains(keys))
        got = self.tier.get_into(keys, list(slab))
        seconds = time.perf_counter() - start
        assert all(g is not None for g in got)
        return seconds, None

    def ray_write(self, n: int, seed: int) -> tuple[float, list[Any]]:
        import ray

        payload = torch.stack([b.payload for b in _blocks(n, seed)])
        start = time.perf_counter()
        ref = ray.put(payload)
        return time.perf_counter() - start, [ref]  # in a list: the caller gets the ref

    def ray_read(self, refs: list[Any], n: int) -> tuple[float, None]:
        import ray

        slab = torch.empty((n, LAYOUT.nbytes), dtype=torch.uint8)
        start = time.perf_counter()
        slab.copy_(ray.get(refs[0]))
        return time.perf_counter() - start, None


def measure(writer: Any, reader: Any, n: int, repeats: int, seed: int) -> dict[str, float]:
    import ray

    times: dict[str, list[float]] = {k: [] for k in ("tier_w", "tier_r", "ray_w", "ray_r")}
    for r in range(repeats):
        key = seed * 1000 + r
        times["tier_w"].append(ray.get(writer.tier_write.remote(n, key))[0])
        times["tier_r"].append(ray.get(reader.tier_read.remote(n, key))[0])
        seconds, refs = ray.get(writer.ray_write.remote(n, key))
        times["ray_w"].append(seconds)
        times["ray_r"].append(ray.get(reader.ray_read.remote(refs, n))[0])
        del refs
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", default="32,128")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--redis-url", default=None)
    args = p.parse_args()
    import ray

    from tests.redis_server import RedisServer

    server = None
    url = args.redis_url
    if url is None:
        server = RedisServer(Path(tempfile.mkdtemp(prefix="strata-pd-")), maxmemory="1gb")
        server.start()
        url = server.url
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        actor = ray.remote(num_cpus=1)(Side)
        writer, reader = actor.remote(url), actor.remote(url)
        print(f"# {platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
              f"Ray {ray.__version__}; block {LAYOUT.nbytes} bytes (SmolLM2-135M, float32, 16 "
              f"tokens); median of {args.repeats}")  # fmt: skip
        print("| blocks | MB | tier write ms | tier read ms | tier total ms | ray put ms | "
              "ray get+copy ms | ray total ms |")
        print("|---|---|---|---|---|---|---|---|")
        for i, n in enumerate(int(b) for b in args.blocks.split(",")):
            t = measure(writer, reader, n, args.repeats, i + 1)
            mb = n * LAYOUT.nbytes / 1e6
            print(f"| {n} | {mb:.1f} | {t['tier_w']:.1f} | {t['tier_r']:.1f} | "
                  f"{t['tier_w'] + t['tier_r']:.1f} | {t['ray_w']:.1f} | {t['ray_r']:.1f} | "
                  f"{t['ray_w'] + t['ray_r']:.1f} |", flush=True)  # fmt: skip
    finally:
        ray.shutdown()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
