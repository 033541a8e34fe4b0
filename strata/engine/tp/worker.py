"""A worker rank (1..N-1): its process's whole life.

    start ─► connect (Communicator) ─► load its share ─► "loaded" ─► recv pool size
          ─► build its KV pool ─► "ready" ─► steps until the stop doorbell or rank 0 is gone

Each step is a doorbell on the pipe (the payload's length; 0 stops the worker) and then
the StepInputs payload by broadcast from rank 0, so the worker idles on the pipe (no
collective timeout while the engine has nothing to do) and every wait inside a step is
bounded by the group's timeout. The worker ignores SIGINT and SIGTERM: rank 0 drains and
stops it. It exits by itself when rank 0 dies: at once if idle (its pipe reaches EOF),
within the timeout if inside a step (the collective fails).
"""

from __future__ import annotations

import contextlib
import os
import signal
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from strata.attention.backend import get_backend
from strata.engine.tp.step_wire import StepInputs
from strata.kv.cache import KVCache
from strata.models.loader import load_model
from strata.models.tp.comm import Communicator

POLL_S = 1.0  # how often an idle worker checks that rank 0 is alive


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its rank of the engine (picklable)."""

    model: str | None
    rank: int
    size: int
    port: int
    timeout_s: float
    device: str
    dtype: torch.dtype
    max_positions: int | None
    seed: int
    block_size: int
    attention_backend: str
    rank0_pid: int


def run_worker(spec: WorkerSpec, conn: Connection) -> None:
    """The worker process's target: report "loaded"/"ready" or ("error", text) on `conn`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)
    try:
        device = torch.device(spec.device)
        comm = Communicator.connect(spec.rank, spec.size, spec.port, spec.timeout_s, device)
        loaded = load_model(spec.model, device, spec.dtype, spec.max_positions, spec.seed,
                            comm=comm)  # fmt: skip
        conn.send(("loaded", None))
        num_blocks = _recv(conn, spec.rank0_pid)
        if num_blocks is None:
            return
        kv = KVCache(loaded.config, num_blocks, spec.block_size, spec.dtype, device)
        conn.send(("ready", None))
        serve_steps(spec, conn, comm, loaded.model, kv)
    except Exception:
        with contextlib.suppress(OSError):  # rank 0 is gone
            conn.send(("error", f"rank {spec.rank}: {traceback.format_exc()}"))


def _rank0_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recv(conn: Connection, rank0_pid: int) -> Any:
    """The next message from rank 0; None once rank 0 is gone (its end of the pipe closed,
    or its process no longer exists)."""
    try:
        while not conn.poll(POLL_S):
            if not _rank0_alive(rank0_pid):
                return None
        return conn.recv()
    except (EOFError, OSError):
        return None


def serve_steps(
    spec: WorkerSpec, conn: Connection, comm: Communicator, model: torch.nn.Module, kv: KVCache
) -> None:
    """Run every step rank 0 sends, until the stop doorbell or rank 0's death."""
    backend = get_backend(spec.attention_backend)
    device = comm.device
    while True:
        length = _recv(conn, spec.rank0_pid)
        if not length:  # the stop doorbell (0), or rank 0 is gone
            return
        payload = comm.broadcast(torch.empty(length, dtype=torch.int64, device=device))
        step = StepInputs.decode(payload.cpu().numpy())
        ids, positions, slots, rows = (
            torch.from_numpy(a).to(device)
            for a in (step.ids, step.positions, step.slots, step.logits_rows)
        )
        meta = backend.prepare(step.layout, slots, device)
        model(ids, positions, kv, backend, meta, rows)
