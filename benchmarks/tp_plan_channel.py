"""Per-step cost of sending a step's inputs (StepInputs) from rank 0 to a tensor-parallel
worker, on CPU (gloo, 2 processes), for the channels one could use:

    pipe      the encoded step as bytes on a multiprocessing pipe
    doorbell  its length on the pipe, the int64 payload by gloo broadcast
    bcast     two gloo broadcasts (length, then payload): no pipe, but an idle worker would
              sit inside a collective and hit its timeout

Strata (strata/engine/tp/channel.py) sends steps up to 64 KiB by pipe, larger ones by
doorbell: a pipe send never waits for a hung worker only while it fits the socket buffer.

Each timed step is: send the step, the worker decodes it, then one 1-element all-reduce
(the embedding's all-reduce ends every real step the same way). The all-reduce alone is
timed too and subtracted, so each number is the channel's own cost per step.

    python benchmarks/tp_plan_channel.py [--iters 300]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import time
from multiprocessing.connection import Connection

import numpy as np
import torch

from strata.attention.backend import BatchLayout
from strata.engine.tp.parallel import free_port
from strata.engine.tp.step_wire import StepInputs
from strata.models.tp.comm import Communicator

CHANNELS = ("none", "pipe", "doorbell", "bcast")


def step_of(batch: int, tokens_each: int, context: int, block_size: int = 16) -> StepInputs:
    """A step of `batch` sequences computing `tokens_each` tokens after `context` tokens."""
    n = batch * tokens_each
    blocks = -(-(context + tokens_each) // block_size)
    tables = [list(range(s * blocks, (s + 1) * blocks)) for s in range(batch)]
    layout = BatchLayout([tokens_each] * batch, [context + tokens_each] * batch, tables, block_size)
    ids = np.arange(n, dtype=np.int64) % 32000
    return StepInputs(ids, ids.copy(), ids.copy(), np.arange(batch, dtype=np.int64), layout)


def send(channel: str, comm: Communicator, conn: Connection, payload: np.ndarray) -> None:
    if channel == "pipe":
        conn.send_bytes(payload.tobytes())
    elif channel == "doorbell":
        conn.send(len(payload))
        comm.broadcast(torch.from_numpy(payload))
    elif channel == "bcast":
        comm.broadcast(torch.tensor([len(payload)], dtype=torch.int64))
        comm.broadcast(torch.from_numpy(payload))


def receive(channel: str, comm: Communicator, conn: Connection) -> None:
    if channel == "pipe":
        data = np.frombuffer(conn.recv_bytes(), dtype=np.int64)
    elif channel == "doorbell":
        data = comm.broadcast(torch.empty(conn.recv(), dtype=torch.int64)).numpy()
    elif channel == "bcast":
        length = int(comm.broadcast(torch.empty(1, dtype=torch.int64)))
        data = comm.broadcast(torch.empty(length, dtype=torch.int64)).numpy()
    else:
        return
    StepInputs.decode(data)


def worker(port: int, conn: Connection, plan: list[tuple[str, int]]) -> None:
    torch.set_num_threads(1)
    comm = Communicator.connect(1, 2, port, 60.0, torch.device("cpu"))
    for channel, iters in plan:
        for _ in range(iters):
            receive(channel, comm, conn)
            comm.all_reduce(torch.zeros(1))


def measure(
    comm: Communicator, conn: Connection, channel: str, step: StepInputs, iters: int
) -> float:
    payload = step.encode()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        send(channel, comm, conn, payload)
        comm.all_reduce(torch.zeros(1))
        times.append(time.perf_counter() - start)
    return statistics.median(times[iters // 10 :])


def encode_time(step: StepInputs, iters: int) -> float:
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step.encode()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = {
        "decode x1": step_of(1, 1, 1024),
        "decode x64": step_of(64, 1, 1024),
        "decode x256": step_of(256, 1, 4096),
        "prefill 2048": step_of(1, 2048, 0),
    }
    plan = [(c, args.iters) for _ in steps for c in CHANNELS]
    port = free_port()
    ours, theirs = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=worker, args=(port, theirs, plan))
    proc.start()
    comm = Communicator.connect(0, 2, port, 60.0, torch.device("cpu"))
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, gloo, 2 processes, {args.iters} steps each, median")
    print("| step | payload bytes | encode us | all-reduce alone us | pipe us | doorbell us "
          "| bcast us |")
    print("|---|---|---|---|---|---|---|")
    for name, step in steps.items():
        us = {c: measure(comm, ours, c, step, args.iters) * 1e6 for c in CHANNELS}
        extra = [f"{us[c] - us['none']:.0f}" for c in CHANNELS[1:]]
        encode = encode_time(step, args.iters) * 1e6
        print(f"| {name} | {step.encode().nbytes} | {encode:.0f} | {us['none']:.0f} | "
              f"{' | '.join(extra)} |")
    proc.join()


if __name__ == "__main__":
    main()
