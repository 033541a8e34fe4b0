"""The load of one request rate, sent from this process or from several (--client-processes).

`run_shard` sends requests at their arrival offsets from a common `start` (a
`time.perf_counter()` value: one monotonic clock for every process of the machine) and
times them, with the event loop's lag sampled throughout (client_load.py).

One event loop parses every chunk of every stream. Hundreds of fast streams keep it busy,
and its delays land in the latencies it reports. `ClientPool` spreads a rate's requests
over worker processes, each with its own loop and HTTP clients: worker k sends requests
k, k + n, k + 2n, ... at their own offsets, so the arrival process is unchanged, and the
records come back merged in request order. `send_all` runs a rate either way, for
`strata bench serve` and for `strata bench throughput --url`.

Invariants:
- Workers start before the first rate and stay until `close`; a worker that dies or
  fails stops the run with a BenchmarkError, never a partial result.
- --max-concurrency is split over the workers (their caps sum to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.sharedctypes import Synchronized
from typing import Any

from strata.bench.client import (
    BenchmarkError,
    BenchRequest,
    ClientSet,
    RequestRecord,
    ServerTarget,
    send_request,
)
from strata.bench.client_load import ClientLoad, LagMonitor

READY_TIMEOUT_S = 120.0  # a spawned worker imports strata (and torch) first
START_LEAD_S = 0.25  # every worker has its shard before the common start
POLL_S = 0.1
STOP_TIMEOUT_S = 5.0


@dataclass
class Shard:
    """What one event loop sent: its records in the order given, the start their offsets
    count from, when the last answer came, and the loop's lag throughout."""

    records: list[RequestRecord]
    start: float
    end: float
    monitor: LagMonitor


async def run_shard(
    clients: ClientSet,
    target: ServerTarget,
    requests: Sequence[BenchRequest],
    offsets: Sequence[float],
    start: float | None,
    max_concurrency: int | None,
    on_done: Callable[[], None],
) -> Shard:
    """Send each request at start + its offset (waiting for a concurrency slot if capped).
    `start` None: as soon as the clients are built."""
    in_flight = min(len(requests), max_concurrency or len(requests))
    gate = asyncio.Semaphore(max(1, in_flight))
    clients.reserve(in_flight)
    if start is None:
        start = time.perf_counter()
    await asyncio.sleep(max(0.0, start - time.perf_counter()))

    async def one(request: BenchRequest, offset: float) -> RequestRecord:
        assert start is not None
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        async with gate, clients.client() as client:
            record = await send_request(client, target, request, start)
        on_done()
        return record

    async with LagMonitor() as monitor:
        records = await asyncio.gather(*map(one, requests, offsets))
        end = time.perf_counter()
    return Shard(list(records), start, end, monitor)


async def send_all(
    clients: ClientSet,
    pool: ClientPool | None,
    target: ServerTarget,
    requests: Sequence[BenchRequest],
    offsets: Sequence[float],
    max_concurrency: int | None,
    on_progress: Callable[[int], None],
) -> tuple[list[RequestRecord], float, ClientLoad]:
    """Every request at its offset, from this process (`pool` None, capped at
    `max_concurrency`) or from the pool's workers (capped as the pool was made): the records
    in request order, the seconds from the start to the last answer, and the client's load.
    `on_progress` gets the number of requests answered so far."""
    if pool is not None:
        return await pool.run(requests, offsets, on_progress)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        on_progress(done)

    shard = await run_shard(clients, target, requests, offsets, None, max_concurrency, tick)
    return shard.records, shard.end - shard.start, ClientLoad.of([shard.monitor])


def split_cap(total: int | None, parts: int) -> list[int | None]:
    """A concurrency cap split into `parts` caps that sum to it (None: no cap)."""
    if total is None:
        return [None] * parts
    return [total // parts + (k < total % parts) for k in range(parts)]


class ClientPool:
    """`processes` worker processes, each sending its share of every rate."""

    def __init__(
        self, processes: int, target: ServerTarget, max_concurrency: int | None, timeout_s: float
    ) -> None:
        ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited event loop
        self._done: Synchronized[int] = ctx.Value("q", 0)
        self._workers: list[tuple[BaseProcess, Connection]] = []
        try:
            for k, cap in enumerate(split_cap(max_concurrency, processes)):
                ours, theirs = ctx.Pipe()
                worker = ctx.Process(
                    target=_worker, args=(theirs, WorkerSpec(target, cap, timeout_s), self._done),
                    name=f"strata-bench-client-{k}", daemon=True,
                )  # fmt: skip
                worker.start()
                theirs.close()
                self._workers.append((worker, ours))
            for k, (proc, conn) in enumerate(self._workers):
                self._expect_ready(k, proc, conn)
        except BaseException:
            self.close()
            raise

    def _expect_ready(self, k: int, proc: BaseProcess, conn: Connection) -> None:
        if not conn.poll(READY_TIMEOUT_S):
            raise BenchmarkError(f"client process {k} did not start within {READY_TIMEOUT_S:g} s")
        _reply(k, proc, conn)

    async def run(
        self,
        requests: Sequence[BenchRequest],
        offsets: Sequence[float],
        on_progress: Callable[[int], None],
    ) -> tuple[list[RequestRecord], float, ClientLoad]:
        """One rate over every worker: the records in request order, the seconds from the
        start to the last answer, and the workers' load. `on_progress` gets the number of
        requests answered so far."""
        n = len(self._workers)
        with self._done.get_lock():
            self._done.value = 0
        start = time.perf_counter() + START_LEAD_S
        for k, (proc, conn) in enumerate(self._workers):
            try:
                conn.send((list(requests[k::n]), list(offsets[k::n]), start))
            except OSError:  # BrokenPipeError among them: the worker is gone
                proc.join(STOP_TIMEOUT_S)
                raise BenchmarkError(f"client process {k} exited with {proc.exitcode}") from None
        results: list[Any] = [None] * n
        while any(r is None for r in results):
            await asyncio.sleep(POLL_S)
            on_progress(self._done.value)
            for k, (proc, conn) in enumerate(self._workers):
                if results[k] is None and conn.poll():
                    results[k] = _reply(k, proc, conn)
                elif results[k] is None and not proc.is_alive():
                    raise BenchmarkError(f"client process {k} exited with {proc.exitcode}")
        on_progress(self._done.value)
        records = sorted((r for shard in results for r in shard.records), key=lambda r: r.index)
        end = max(shard.end for shard in results)
        return records, end - start, ClientLoad.of([shard.monitor for shard in results])

    def close(self) -> None:
        for _, conn in self._workers:
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(None)
        for proc, conn in self._workers:
            proc.join(STOP_TIMEOUT_S)
            if proc.is_alive():
                proc.terminate()
                proc.join(STOP_TIMEOUT_S)
            conn.close()
        self._workers = []


def _reply(k: int, proc: BaseProcess, conn: Connection) -> Any:
    """A worker's message; its error, or its death, as a BenchmarkError."""
    try:
        kind, payload = conn.recv()
    except (EOFError, OSError):
        proc.join(STOP_TIMEOUT_S)
        raise BenchmarkError(f"client process {k} exited with {proc.exitcode}") from None
    if kind == "error":
        raise BenchmarkError(f"client process {k} failed: {payload}")
    return payload


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process sends to, and how: its concurrency cap and request timeout."""

    target: ServerTarget
    max_concurrency: int | None
    timeout_s: float


def _worker(conn: Connection, spec: WorkerSpec, done: Synchronized[int]) -> None:
    try:
        asyncio.run(_serve_shards(conn, spec, done))
    except BaseException as exc:  # reported to the parent, which stops the run
        with contextlib.suppress(BrokenPipeError, OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise


async def _serve_shards(conn: Connection, spec: WorkerSpec, done: Synchronized[int]) -> None:
    """Run each shard the parent sends until it sends None."""
    loop = asyncio.get_running_loop()

    def tick() -> None:
        with done.get_lock():
            done.value += 1

    async with ClientSet(spec.timeout_s) as clients:
        conn.send(("ready", None))
        while True:
            job = await loop.run_in_executor(None, conn.recv)
            if job is None:
                return
            requests, offsets, start = job
            result = await run_shard(
                clients, spec.target, requests, offsets, start, spec.max_concurrency, tick
            )
            conn.send(("shard", result))
