"""Disk and remote tier I/O on the CPU alone (no GPU): read rates before/after the
parallel readers, one file per block against one per run of blocks, and how much a
remote write-through slows a thread of the engine's process (GIL contention).

    python3 benchmarks/tier_io_cpu.py [--only disk,layout,remote,gil] [--blocks 256]
        [--dir /tmp/strata-tier-io] [--redis-url redis://127.0.0.1:6399/0]

Blocks have Llama-3-8B's shape (32 layers, 8 KV heads, head dim 128, 16 tokens, bf16:
2 MiB). Disk reads are from a warm page cache (every file read once first). Without
--redis-url the remote parts start a redis-server/valkey-server on a free loopback port,
pinned to CPU 1. The gil part pins the engine stand-in to CPU 0 and the writing thread
(and so the writer process it starts) to CPU 1, so that what slows the stand-in is the
GIL, not a shared core.
"before" re-creates the read paths of commit 374f5df: disk files one at a time on one
thread into a read buffer, then copied into the slot; remote one MGET of 8 blocks at a
time on one connection; writes as one redis-py pipeline of joined values on the io thread.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import redis
import torch

from strata.kv.tiers import block_format
from strata.kv.tiers.base import BlockLayout, StoredBlock
from strata.kv.tiers.disk import DiskTier
from strata.kv.tiers.remote import RemoteTier

LAYOUT = BlockLayout("ab" * 32, 32, 8, 128, 16, "bfloat16")
GB = 1e9


def _blocks(n: int) -> list[StoredBlock]:
    slab = torch.randint(0, 256, (n, LAYOUT.nbytes), dtype=torch.uint8)
    return [StoredBlock(i.to_bytes(32, "big"), tuple(range(16)), slab[i]) for i in range(n)]


def _best(fn: Callable[[], int], repeats: int = 3) -> float:
    """GB/s of the best of `repeats` runs of fn (which returns the bytes it moved)."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        nbytes = fn()
        rates.append(nbytes / (time.perf_counter() - start) / GB)
    return max(rates)


# ---- disk -------------------------------------------------------------------------------


def _write_old_format(directory: str, blocks: Sequence[StoredBlock]) -> list[str]:
    """Files as the disk tier wrote them before: block_format bytes, no gap."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for block in blocks:
        paths.append(os.path.join(directory, block.key.hex()))
        with open(paths[-1], "wb") as f:
            f.write(b"".join(block_format.encode(LAYOUT, block)))
    return paths


def _read_sequential(paths: Sequence[str], keys: Sequence[bytes], slab: torch.Tensor) -> int:
    """The read path before: each file whole into a buffer on one thread, decoded, then
    copied into its slot."""
    size = block_format.encoded_size(LAYOUT)
    view = memoryview(bytearray(size))
    for i, (path, key) in enumerate(zip(paths, keys, strict=True)):
        with open(path, "rb", buffering=0) as f:
            f.readinto(view)
        slab[i].copy_(block_format.decode(LAYOUT, view, key).payload)
    return len(keys) * size


def _read_parallel(tier: DiskTier, keys: Sequence[bytes], slab: torch.Tensor) -> int:
    for lo in range(0, len(keys), tier.read_batch):
        batch = keys[lo : lo + tier.read_batch]
        got = tier.get_into(batch, list(slab[lo : lo + len(batch)]))
        assert all(b is not None for b in got)
    return len(keys) * tier.file_bytes


def bench_disk(directory: str, n: int) -> list[str]:
    blocks = _blocks(n)
    keys = [b.key for b in blocks]
    slab = torch.empty((n, LAYOUT.nbytes), dtype=torch.uint8)
    old = _write_old_format(os.path.join(directory, "before"), blocks)
    _read_sequential(old, keys, slab)  # warms the page cache
    rows = [f"| before: one file at a time, read buffer + copy | 1 | "
            f"{_best(lambda: _read_sequential(old, keys, slab)):.2f} |"]  # fmt: skip
    DiskTier(LAYOUT, directory, 1 << 40).put(blocks)
    for threads in (1, 2, 4, 8):
        tier = DiskTier(LAYOUT, directory, 1 << 40, read_threads=threads)
        _read_parallel(tier, keys, slab)  # warms the page cache
        rate = _best(lambda: _read_parallel(tier, keys, slab))  # noqa: B023
        label = "after: preadv into the slot (payload page-aligned), checked on the reader"
        rows.append(f"| {label} | {threads} | {rate:.2f} |")
        tier.close()
    rows += _cold_rows(directory, keys)
    assert all(torch.equal(slab[i], blocks[i].payload) for i in range(n))
    head = ["| disk read (page cache warm unless said) | threads | GB/s |", "|---|---|---|"]
    return head + rows


def _drop_cache(tier: DiskTier, keys: Sequence[bytes]) -> None:
    os.sync()
    for key in keys:
        fd = os.open(tier.path_of(key), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def _cold_rows(directory: str, keys: Sequence[bytes]) -> list[str]:
    """Page cache dropped (posix_fadvise) before each buffered run; O_DIRECT into a
    page-aligned slab (as pinned CUDA memory is) never uses it."""
    import mmap

    memory = mmap.mmap(-1, len(keys) * LAYOUT.nbytes)
    slab = torch.frombuffer(memory, dtype=torch.uint8).view(len(keys), LAYOUT.nbytes)
    rows = []
    for direct in (False, True):
        for threads in (1, 8):
            tier = DiskTier(LAYOUT, directory, 1 << 40, read_threads=threads, direct_io=direct)

            def read(t: DiskTier = tier, direct: bool = direct) -> int:
                if not direct:
                    _drop_cache(t, keys)
                return _read_parallel(t, keys, slab)

            label = "after, O_DIRECT" if direct else "after, page cache dropped, buffered"
            rows.append(f"| {label} | {threads} | {_best(read):.2f} |")
            tier.close()
    return rows


def _read_files(paths: Sequence[str], sizes: int, slab: torch.Tensor, threads: int) -> int:
    """Raw preadv of each file into consecutive slab rows, `threads` files at once."""
    flat = memoryview(slab.numpy().data).cast("B")

    def one(i: int) -> int:
        fd = os.open(paths[i], os.O_RDONLY)
        try:
            return os.preadv(fd, [flat[i * sizes : (i + 1) * sizes]], 0)
        finally:
            os.close(fd)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(one, range(len(paths))))


def bench_layout(directory: str, n: int, run: int = 16) -> list[str]:
    """One file per 2 MiB block against one file per run of `run` blocks (no checks)."""
    data = torch.randint(0, 256, (n, LAYOUT.nbytes), dtype=torch.uint8)
    slab = torch.empty_like(data)
    rows = ["| disk layout, page cache warm | threads | GB/s |", "|---|---|---|"]
    for per_file in (1, run):
        folder = os.path.join(directory, f"layout-{per_file}")
        os.makedirs(folder, exist_ok=True)
        paths = []
        for i in range(0, n, per_file):
            paths.append(os.path.join(folder, f"{i:06d}"))
            data[i : i + per_file].numpy().tofile(paths[-1])
        size = per_file * LAYOUT.nbytes
        _read_files(paths, size, slab, 1)
        for threads in (1, 4, 8):
            rate = _best(lambda: _read_files(paths, size, slab, threads))  # noqa: B023
            label = "one file per block" if per_file == 1 else f"one file per {per_file} blocks"
            rows.append(f"| {label} ({size >> 20} MiB files) | {threads} | {rate:.2f} |")
        assert torch.equal(slab, data)
    return rows


# ---- remote -----------------------------------------------------------------------------


@contextmanager
def redis_server(url: str | None, workdir: str) -> Iterator[str]:
    if url is not None:
        yield url
        return
    binary = shutil.which("valkey-server") or shutil.which("redis-server")
    if binary is None:
        raise SystemExit("no valkey-server or redis-server on PATH: pass --redis-url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--maxmemory", "4gb", "--dir", workdir],
                            stdout=subprocess.DEVNULL)  # fmt: skip
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(proc.pid, {1})  # CPU 0 is the engine stand-in's (gil part)
    try:
        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait()


def _read_remote(tier: RemoteTier, keys: Sequence[bytes], slab: torch.Tensor) -> int:
    for lo in range(0, len(keys), tier.read_batch):
        batch = keys[lo : lo + tier.read_batch]
        got = tier.get_into(batch, list(slab[lo : lo + len(batch)]))
        assert all(b is not None for b in got)
    return len(keys) * block_format.encoded_size(LAYOUT)


def bench_remote(url: str, n: int) -> list[str]:
    blocks = _blocks(n)
    keys = [b.key for b in blocks]
    slab = torch.empty((n, LAYOUT.nbytes), dtype=torch.uint8)
    writer = RemoteTier(LAYOUT, url, timeout_s=5.0)
    redis.Redis.from_url(url).flushall()
    writer.put(blocks)
    writer.close()
    rows = ["| remote read (loopback) | connections | blocks per MGET | GB/s |",
            "|---|---|---|---|"]  # fmt: skip
    for label, threads, per in (("before", 1, 8), ("after", 1, 3), ("after", 4, 3),
                                ("after", 8, 3), ("after", 8, 1)):  # fmt: skip
        tier = RemoteTier(LAYOUT, url, timeout_s=5.0, read_threads=threads)
        tier._per_mget = per
        tier.read_batch = per if label == "before" else threads * per
        rate = _best(lambda: _read_remote(tier, keys, slab))  # noqa: B023
        rows.append(f"| {label} | {threads} | {per} | {rate:.2f} |")
        tier.close()
    assert all(torch.equal(slab[i], blocks[i].payload) for i in range(n))
    return rows


# ---- a remote write-through beside the engine thread ------------------------------------


def _inline_put(tier: RemoteTier, blocks: Sequence[StoredBlock]) -> None:
    """The write path before: values joined and SET by one redis-py pipeline, in-process."""
    values = [b"".join(block_format.encode(LAYOUT, b)) for b in blocks]
    pipe = tier._client.pipeline(transaction=False)
    for block, value in zip(blocks, values, strict=True):
        pipe.set(tier.name_of(block.key), value, nx=True)
    pipe.execute()


def _engine_stand_in(stop: threading.Event, times: list[float]) -> None:
    """A timed loop of 50 small torch ops (each releases and retakes the GIL, as the
    engine thread's launches do), on CPU 0."""
    os.sched_setaffinity(0, {0})
    x = torch.zeros(64)
    while not stop.is_set():
        start = time.perf_counter()
        for _ in range(50):
            x = x + 1
        times.append(time.perf_counter() - start)


def _timed_beside(write: Callable[[], None] | None) -> tuple[list[float], float]:
    """Stand-in iteration times while `write` runs on a thread pinned to CPU 1."""
    times: list[float] = []
    stop = threading.Event()
    loop = threading.Thread(target=_engine_stand_in, args=(stop, times))
    loop.start()
    time.sleep(0.2)
    times.clear()
    elapsed = [0.0]

    def writer() -> None:
        os.sched_setaffinity(0, {1})
        start = time.perf_counter()
        if write is None:
            time.sleep(0.5)
        else:
            write()
        elapsed[0] = time.perf_counter() - start

    thread = threading.Thread(target=writer)
    thread.start()
    thread.join()
    stop.set()
    loop.join()
    return times, elapsed[0]


def bench_gil(url: str, n: int, rounds: int = 5) -> list[str]:
    """`rounds` interleaved runs of each case; medians over the runs of each run's
    iteration-time statistics (this machine's load moves single runs by 50%)."""
    blocks = _blocks(n)
    client = redis.Redis.from_url(url)
    tier = RemoteTier(LAYOUT, url, timeout_s=5.0)
    cases: list[tuple[str, Callable[[], None] | None]] = [
        ("idle (no write)", None),
        ("before: redis-py pipeline on the io thread", lambda: _inline_put(tier, blocks)),
        ("after: writer process (RemoteTier.put)", lambda: tier.put(blocks)),
    ]
    _timed_beside(lambda: tier.put(blocks[:1]))  # starts the writer process on CPU 1
    runs: dict[str, list[tuple[float, ...]]] = {label: [] for label, _ in cases}
    for _ in range(rounds):
        for label, write in cases:
            client.flushall()
            times, seconds = _timed_beside(write)
            ms = sorted(t * 1e3 for t in times)
            rate = n * LAYOUT.nbytes / seconds / GB if write else 0.0
            runs[label].append((rate, ms[len(ms) // 2], statistics.mean(ms),
                                ms[int(0.99 * len(ms))], ms[-1]))  # fmt: skip
    tier.close()
    mib = n * LAYOUT.nbytes / 2**20
    rows = [f"| write-through of {n} blocks ({mib:.0f} MiB), median of {rounds} runs | put GB/s "
            "| loop p50 ms | mean | p99 | max |", "|---|---|---|---|---|---|"]  # fmt: skip
    for label, stats in runs.items():
        rate, p50, mean, p99, top = (statistics.median(col) for col in zip(*stats, strict=True))
        rows.append(f"| {label} | {rate:.2f} | {p50:.3f} | {mean:.3f} | {p99:.2f} | {top:.1f} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="disk,layout,remote,gil", help="parts to run")
    p.add_argument("--blocks", type=int, default=256, help="2 MiB blocks per part")
    p.add_argument("--dir", default=None, help="disk directory (default: a temporary one)")
    p.add_argument("--redis-url", default=None, help="a running server (default: start one)")
    a = p.parse_args()
    only = set(a.only.split(","))
    torch.set_num_threads(1)
    cpu = platform.processor() or platform.machine()
    print(f"{time.strftime('%Y-%m-%d')} {cpu}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, redis-py {redis.__version__}")  # fmt: skip
    workdir = tempfile.mkdtemp(prefix="strata-tier-io-", dir=a.dir)
    try:
        if "disk" in only:
            print("\n".join(bench_disk(os.path.join(workdir, "disk"), a.blocks)), "\n")
        if "layout" in only:
            print("\n".join(bench_layout(workdir, a.blocks)), "\n")
        if only & {"remote", "gil"}:
            with redis_server(a.redis_url, workdir) as url:
                if "remote" in only:
                    print("\n".join(bench_remote(url, a.blocks // 2)), "\n")
                if "gil" in only:
                    print("\n".join(bench_gil(url, 64)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
