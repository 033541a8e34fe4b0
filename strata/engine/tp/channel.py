"""The step channel from rank 0 to each worker: one message a step on the worker's pipe.

A message is an int64 array:

    [0]                  stop
    [n]                  the step is n int64s, broadcast from rank 0 right after
    StepInputs.encode()  the step itself (always 10 or more values)
    [-1] + pickle bytes  a WorkerOp: a tier operation (kv/tiers/tier_ops.py), a KV
                         policy's compaction (kv/policies/runtime/rank_compaction.py) or a
                         recall release (kv/recall/mirror.py), run before the next step;
                         the worker may answer ("tier", key, value)

Steps up to INLINE_BYTES go inline on the pipe, larger ones by broadcast: measured on the
2-core CPU machine (benchmarks/tp_plan_channel.py, docs/benchmarks.md) the pipe costs
~100-200 us a step against ~330-470 us for a doorbell plus a gloo broadcast. An inline
send never blocks: a worker reads step k before it joins step k's first all-reduce, so
when rank 0 sends step k+1 the pipe is empty, and INLINE_BYTES is below the socket buffer.
A larger step goes by broadcast, whose wait the group's timeout bounds. Between steps an
idle worker waits on the pipe, where no collective timeout applies. Operations sent
between steps may fill the pipe; rank 0 then waits for the worker to read, which it
does without waiting on rank 0 (a tier load waits on the worker's own threads), and
its answers are a few per load, which rank 0 reads as its own loads land.
"""

from __future__ import annotations

import pickle
from multiprocessing.connection import Connection
from typing import TypeAlias

import numpy as np
import torch

from strata.engine.core.channels import pid_alive
from strata.engine.tp.step_wire import StepInputs
from strata.kv.policies.runtime.rank_compaction import CompactOp
from strata.kv.recall.mirror import RecallRelease
from strata.kv.tiers.tier_ops import TierOp
from strata.models.tp.comm import Communicator

INLINE_BYTES = 64 << 10
POLL_S = 1.0  # how often an idle worker checks that rank 0 is alive
OP_MARK = np.array([-1], np.int64).tobytes()

WorkerOp: TypeAlias = TierOp | CompactOp | RecallRelease


def send_step(conns: list[Connection], comm: Communicator, step: StepInputs) -> None:
    payload = step.encode()
    if payload.nbytes <= INLINE_BYTES:
        data = payload.tobytes()
        for conn in conns:
            conn.send_bytes(data)
        return
    bell = np.array([len(payload)], np.int64)
    for conn in conns:
        conn.send_bytes(bell.tobytes())
    comm.broadcast(torch.from_numpy(payload).to(comm.device))


def send_op(conns: list[Connection], op: WorkerOp) -> None:
    data = OP_MARK + pickle.dumps(op, protocol=pickle.HIGHEST_PROTOCOL)
    for conn in conns:
        conn.send_bytes(data)


def send_stop(conn: Connection) -> None:
    conn.send_bytes(np.zeros(1, np.int64).tobytes())


def receive_step(
    conn: Connection, comm: Communicator, rank0_pid: int
) -> StepInputs | WorkerOp | None:
    """The next step or operation; None for stop, or once rank 0 is gone."""
    message = receive(conn, rank0_pid)
    if message is None:
        return None
    if message[: len(OP_MARK)] == OP_MARK:
        op: WorkerOp = pickle.loads(message[len(OP_MARK) :])  # from rank 0, our parent
        return op
    data = np.frombuffer(bytearray(message), dtype=np.int64)  # writable: torch wraps it
    if len(data) > 1:
        return StepInputs.decode(data)
    if data[0] == 0:
        return None
    payload = torch.empty(int(data[0]), dtype=torch.int64, device=comm.device)
    return StepInputs.decode(comm.broadcast(payload).cpu().numpy())


def receive(conn: Connection, rank0_pid: int) -> bytes | None:
    """The next message's bytes; None once rank 0 is gone (its end of the pipe closed, or
    its process no longer exists)."""
    try:
        while not conn.poll(POLL_S):
            if not pid_alive(rank0_pid):
                return None
        return conn.recv_bytes()
    except (EOFError, OSError):
        return None

