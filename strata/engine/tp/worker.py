"""A worker rank (1..N-1): its process's whole life.

    start ─► connect (Communicator) ─► load its share ─► "loaded" ─► recv pool size
          ─► build its KV pool ─► "ready" ─► steps until the stop doorbell or rank 0 is gone

Each step is a doorbell on the pipe (the payload's length; 0 stops the worker) and then
the StepInputs payload by broadcast from rank 0, so the worker idles on the pipe (no
collective timeout while the engine has nothing to do) and every wait inside a step is
bounded by the group's timeout. The worker ignores SIGINT and SIGTERM: rank 0 drains and
stops it, and it exits by itself within a second of rank 0's death.
"""

from __future__ import annotations

import contextlib
import os
import signal
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

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
    parent_pid: int


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
        num_blocks = _recv_object(conn, spec.parent_pid)
        if num_blocks is None:
            return
        kv = KVCache(loaded.config, num_blocks, spec.block_size, spec.dtype, device)
        conn.send(("ready", None))
        serve_steps(spec, conn, comm, loaded.model, kv)
    except Exception:
        with contextlib.suppress(OSError):  # rank 0 is gone
            conn.send(("error", f"rank {spec.rank}: {traceback.format_exc()}"))


def _parent_alive(parent_pid: int) -> bool:
    return os.getppid() == parent_pid


def _recv_object(conn: Connection, parent_pid: int) -> int | None:
    while not conn.poll(POLL_S):
        if not _parent_alive(parent_pid):
            return None
    value: int = conn.recv()
    return value


def serve_steps(
    spec: WorkerSpec, conn: Connection, comm: Communicator, model: torch.nn.Module, kv: KVCache
) -> None:
    """Run every step rank 0 sends, until the stop doorbell or rank 0's death."""
    backend = get_backend(spec.attention_backend)
    device = comm.device
    while True:
        if not conn.poll(POLL_S):
            if not _parent_alive(spec.parent_pid):
                return
            continue
        length: int = conn.recv()
        if length == 0:
            return
        payload = comm.broadcast(torch.empty(length, dtype=torch.int64, device=device))
        step = StepInputs.decode(payload.cpu().numpy())
        ids, positions, slots, rows = (
            torch.from_numpy(a).to(device)
            for a in (step.ids, step.positions, step.slots, step.logits_rows)
        )
        meta = backend.prepare(step.layout, slots, device)
        model(ids, positions, kv, backend, meta, rows)
