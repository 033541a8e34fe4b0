"""A worker rank (1..N-1): its process's whole life.

    start ─► connect (Communicator) ─► load its share ─► "loaded" ─► pool size (blocks)
          ─► build its KV pool ─► "ready" ─► steps (channel.py) until stop or rank 0 is gone

The worker ignores SIGINT and SIGTERM: rank 0 drains and stops it. It exits by itself
when rank 0 dies: at once if idle (its pipe reaches EOF), within the group's timeout if
inside a step (the collective fails).
"""

from __future__ import annotations

import contextlib
import signal
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np
import torch

from strata.attention.backend import get_backend
from strata.engine.tp.channel import receive, receive_step
from strata.kv.cache import KVCache
from strata.models.loader import load_model
from strata.models.tp.comm import Communicator


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
    threads: int  # torch threads (CPU ranks share the host's cores)


def run_worker(spec: WorkerSpec, conn: Connection) -> None:
    """The worker process's target: report "loaded"/"ready" or ("error", text) on `conn`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(spec.threads)
    try:
        device = torch.device(spec.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        comm = Communicator.connect(spec.rank, spec.size, spec.port, spec.timeout_s, device)
        loaded = load_model(spec.model, device, spec.dtype, spec.max_positions, spec.seed,
                            comm=comm)  # fmt: skip
        conn.send(("loaded", None))
        message = receive(conn, spec.rank0_pid)
        if message is None:
            return
        num_blocks = int(np.frombuffer(message, dtype=np.int64)[0])
        kv = KVCache(loaded.config, num_blocks, spec.block_size, spec.dtype, device)
        conn.send(("ready", None))
        serve_steps(spec, conn, comm, loaded.model, kv)
    except Exception:
        with contextlib.suppress(OSError):  # rank 0 is gone
            conn.send(("error", f"rank {spec.rank}: {traceback.format_exc()}"))


def serve_steps(
    spec: WorkerSpec, conn: Connection, comm: Communicator, model: torch.nn.Module, kv: KVCache
) -> None:
    """Run every step rank 0 sends, until it says stop or is gone."""
    backend = get_backend(spec.attention_backend)
    device = comm.device
    while True:
        step = receive_step(conn, comm, spec.rank0_pid)
        if step is None:
            return
        ids, positions, slots, rows = (
            torch.from_numpy(a).to(device)
            for a in (step.ids, step.positions, step.slots, step.logits_rows)
        )
        meta = backend.prepare(step.layout, slots, device)
        model(ids, positions, kv, backend, meta, rows)
