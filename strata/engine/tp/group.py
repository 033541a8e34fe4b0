"""WorkerGroup: rank 0's side of tensor parallelism (the engine's own process is rank 0).

It starts the worker processes, meets them in a Communicator, hands them the KV pool
size, and sends every step's StepInputs (channel.py). It is also the one place that
turns a broken rank into an error: any failure of a step that involves the group is
re-raised as TensorParallelError naming the ranks that died or went silent (with the
traceback a worker reported, if any); the group is then stopped (no process is left
behind) and every later step fails at once.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import numpy as np

from strata.engine.tp.channel import send_step, send_stop
from strata.engine.tp.step_wire import StepInputs
from strata.engine.tp.worker import WorkerSpec, run_worker
from strata.engine.tp.worker_recall import RecallSize
from strata.errors import TensorParallelError
from strata.models.tp.comm import Communicator

logger = logging.getLogger("strata.engine")

STOP_GRACE_S = 5.0  # a worker asked to stop is killed after this long


def _context() -> mp.context.SpawnContext | mp.context.ForkServerContext:
    """Forkserver: a clean single-threaded server (no CUDA, no OpenMP pool) forks each
    worker with strata already imported, instead of a seconds-long import per worker."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["strata.engine.tp.worker"])
    return ctx


class WorkerGroup:
    def __init__(self, specs: list[WorkerSpec], timeout_s: float) -> None:
        ctx = _context()
        self.timeout_s = timeout_s
        self.procs: list[BaseProcess] = []
        self.conns: list[Connection] = []
        for spec in specs:
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=run_worker, args=(spec, theirs), daemon=True,
                               name=f"strata-tp-rank{spec.rank}")  # fmt: skip
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self.conns.append(ours)
        self.failure: str | None = None
        self.started = time.monotonic()
        self.steps = 0
        self.send_seconds = 0.0  # encoding, doorbells and broadcast of every step
        self._finalizer = weakref.finalize(self, _stop_all, self.procs, self.conns)

    # ---- start-up ----------------------------------------------------------------------------

    def expect(self, message: str, timeout_s: float) -> None:
        """Wait for every worker to report `message`; TensorParallelError if one reports an
        error, exits, or stays silent for timeout_s."""
        deadline = time.monotonic() + timeout_s
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns, strict=True), 1):
            while not conn.poll(0.2):
                if not proc.is_alive():
                    self._fail(f"rank {rank} exited (code {proc.exitcode}) before {message}")
                if time.monotonic() > deadline:
                    self._fail(
                        f"rank {rank} (pid {proc.pid}) did not report {message} within "
                        f"{timeout_s:.0f} s"
                    )
            kind, detail = conn.recv()
            if kind != message:
                self._fail(f"rank {rank} failed to start: {detail}")

    def send_pool_size(self, num_blocks: int, recall: RecallSize | None = None) -> None:
        """[blocks], or [blocks, recall host slots, GPU bytes, model KV heads]."""
        sizes = [num_blocks]
        if recall is not None:
            sizes += [recall.slots, recall.gpu_bytes, recall.model_kv_heads]
        for conn in self.conns:
            conn.send_bytes(np.array(sizes, np.int64).tobytes())
        self.expect("ready", self.timeout_s)

    @property
    def running(self) -> bool:
        """Started, and neither stopped nor failed."""
        return self.failure is None and self._finalizer.alive

    # ---- steps -------------------------------------------------------------------------------

    def send(self, comm: Communicator, step: StepInputs) -> None:
        """Send the step's inputs to every worker (channel.py)."""
        start = time.perf_counter()
        with self.guard():
            send_step(self.conns, comm, step)
        self.steps += 1
        self.send_seconds += time.perf_counter() - start

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Run a part of a step that involves every rank; a failure there is the group's."""
        if self.failure is not None:
            raise TensorParallelError(f"the tensor-parallel group failed earlier: {self.failure}")
        try:
            yield
        except TensorParallelError:
            raise
        except Exception as exc:
            self._fail(self._diagnose(exc))

    def _diagnose(self, exc: Exception) -> str:
        time.sleep(0.2)  # a rank killed mid-step: let its exit register before blaming it
        reasons = []
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns, strict=True), 1):
            said = _last_words(conn)
            if not proc.is_alive():
                reasons.append(f"rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}")
            if said:
                reasons.append(said)
        if reasons:
            return "; ".join(reasons)
        return (
            f"a rank did not answer within {self.timeout_s:g} s (tp_timeout) or the "
            f"collective failed: {type(exc).__name__}: {str(exc)[:300]}"
        )

    def _fail(self, reason: str) -> None:
        self.failure = reason
        logger.critical("tensor parallelism failed: %s; stopping every rank", reason)
        self.stop()
        raise TensorParallelError(f"tensor-parallel engine failed: {reason}")

    # ---- shutdown ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask every worker to stop, then kill those still running; idempotent."""
        self._finalizer()


def _last_words(conn: Connection) -> str | None:
    """The error a worker reported before exiting, if it did (run_worker)."""
    try:
        if conn.poll(0):
            kind, detail = conn.recv()
            return f"{detail}" if kind == "error" else None
    except (EOFError, OSError):
        pass
    return None


def _stop_all(procs: list[BaseProcess], conns: list[Connection]) -> None:
    for conn in conns:
        with contextlib.suppress(OSError):  # already gone
            send_stop(conn)
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in procs:
        proc.join(max(deadline - time.monotonic(), 0.0))
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)
    for conn in conns:
        conn.close()
