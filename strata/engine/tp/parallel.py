"""TensorParallel: the engine's handle on its tensor-parallel ranks (rank 0 is this process).

    start_tensor_parallel(config, device, dtype, max_positions)
        checks the layout (heads, devices, backend) before any process starts,
        starts ranks 1..N-1 (WorkerGroup) and connects rank 0's Communicator;
    load_model(..., comm=tp.comm)      rank 0 loads its share while the workers load theirs;
    tp.loaded(); tp.set_pool(blocks, recall)   the workers build the same pool, in blocks,
                                       their own tiers, driven by rank 0's (tp.peers()),
                                       and their recall stores, mirroring rank 0's;
    runner: tp.send(step) + `with tp.guard(): model(...)` for every step; tp.close().
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from strata.attention.backend import choose_backend
from strata.config import EngineConfig
from strata.engine.tp.group import WorkerGroup
from strata.engine.tp.peers import WorkerPeers
from strata.engine.tp.step_wire import StepInputs
from strata.engine.tp.worker import WorkerSpec
from strata.engine.tp.worker_recall import RecallSize
from strata.errors import TensorParallelError
from strata.kv.codec import get_codec
from strata.kv.recall.build import recall_enabled
from strata.kv.recall.manager import RecallManager
from strata.kv.recall.mirror import RecallRelease
from strata.models.loader import read_model_config
from strata.models.tp.comm import Communicator, backend_for
from strata.models.tp.layout import ShardLayout

logger = logging.getLogger("strata.engine")

LOAD_FLOOR_S = 120.0  # the least time a worker gets to load its shard after rank 0

LOG_EVERY = 1000  # steps between logs of the all-reduce and send time per step


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rank_devices(device: torch.device, size: int) -> list[torch.device]:
    """One device a rank: cuda:i, cuda:i+1, ... from the engine's; every rank on the CPU.
    ValueError when the host has fewer devices (or CPU cores) than ranks."""
    if device.type == "cuda":
        first = device.index or 0
        count = torch.cuda.device_count()
        if first + size > count:
            raise ValueError(
                f"tensor_parallel_size {size} from {device} needs {first + size} CUDA devices; "
                f"this host has {count}"
            )
        return [torch.device("cuda", first + r) for r in range(size)]
    cores = os.cpu_count() or 1
    if size > cores:
        raise ValueError(
            f"tensor_parallel_size {size} is more ranks than this host's {cores} CPU cores"
        )
    return [device] * size


def kv_head_slices(layout: ShardLayout) -> list[slice]:
    out = []
    for rank in range(layout.size):
        shard = ShardLayout(layout.full, rank, layout.size)
        out.append(slice(shard.first_kv_head, shard.first_kv_head + shard.local_kv_heads))
    return out


class TensorParallel:
    def __init__(self, layout: ShardLayout, group: WorkerGroup, comm: Communicator) -> None:
        self.layout, self.group, self.comm = layout, group, comm
        self._logged = (0.0, 0.0)  # all-reduce and send seconds at the last log

    def loaded(self) -> None:
        """Wait for the workers' shards: three times as long as rank 0 took for its own
        (they load alike, in parallel, on shared cores or disks) plus tp_timeout, and at
        least LOAD_FLOOR_S; a rank silent past that fails the engine."""
        took = time.monotonic() - self.group.started
        self.group.expect("loaded", max(LOAD_FLOOR_S, 3 * took + self.group.timeout_s))

    def set_pool(self, num_blocks: int, recall: RecallManager | None = None) -> None:
        """The workers' pool, in blocks, and their recall stores, sized as rank 0's
        `recall`, whose releases they then follow (worker_recall.py)."""
        size = None
        if recall is not None:
            peers = self.peers()
            recall.release_listeners.append(lambda serial: peers.send(RecallRelease(serial)))
            size = RecallSize(recall.store.num_slots, recall.gpu_budget,
                              self.layout.full.num_kv_heads)  # fmt: skip
        self.group.send_pool_size(num_blocks, size)
        logger.info("tensor parallel: %s; every rank ready (%d KV blocks each, its own "
                    "KV heads)", self.layout.describe(), num_blocks)  # fmt: skip

    @property
    def rank_layout(self) -> str:
        """This rank's name in block keys and tier layouts."""
        return f"tp{self.layout.size}r{self.comm.rank}"

    @property
    def kv_head_slices(self) -> list[slice]:
        """Each rank's KV heads among the model's (ranks may share one: replicated)."""
        return kv_head_slices(self.layout)

    def peers(self) -> WorkerPeers:
        """The workers, for rank 0's ShardedTierManager and KV policy driver."""
        return WorkerPeers(self.group)

    def send(self, step: StepInputs) -> None:
        if self.group.steps and self.group.steps % LOG_EVERY == 0:
            self._log_recent()
        self.group.send(self.comm, step)

    def _log_recent(self) -> None:
        """Log the last LOG_EVERY steps' all-reduce and send time per step."""
        reduce, send = self.comm.allreduce_seconds, self.group.send_seconds
        last_reduce, last_send = self._logged
        self._logged = (reduce, send)
        logger.info(
            "tensor parallel: last %d steps: all-reduce %.2f ms/step, step send %.3f ms/step",
            LOG_EVERY, (reduce - last_reduce) / LOG_EVERY * 1e3,
            (send - last_send) / LOG_EVERY * 1e3,
        )  # fmt: skip

    @contextmanager
    def guard(self) -> Iterator[None]:
        with self.group.guard():
            yield

    def stats(self) -> dict[str, Any]:
        return {
            "tensor_parallel_size": self.layout.size,
            "tp_steps": self.group.steps,
            "tp_step_send_seconds": self.group.send_seconds,
            "tp_allreduce_seconds": self.comm.allreduce_seconds,
            "tp_allreduces": self.comm.num_allreduces,
        }

    def close(self) -> None:
        self.group.stop()


def start_tensor_parallel(
    config: EngineConfig, device: torch.device, dtype: torch.dtype, max_positions: int | None
) -> TensorParallel:
    """Check the layout, start the workers and connect rank 0 (see module docstring)."""
    par = config.parallel
    size = par.tensor_parallel_size
    layout = ShardLayout(read_model_config(config.model), 0, size)  # ValueError if unshardable
    devices = rank_devices(device, size)
    backend_for(device)
    port = par.port if par.port is not None else free_port()
    backend = choose_backend(config.attention_backend, device)[0]
    threads = max((os.cpu_count() or 1) // size, 1)  # CPU ranks share the host's cores
    lossless = get_codec(config.cache.kv_cache_dtype).lossless
    tail_rows = 0 if lossless else config.scheduler.max_num_seqs  # as rank 0's (build.py)
    specs = [
        WorkerSpec(
            config.model, rank, size, port, par.timeout_s, str(devices[rank]), dtype,
            max_positions, config.seed, config.cache.block_size,
            backend, os.getpid(), threads, config.cache.tiers, kv_head_slices(layout)[rank],
            config.cache.kv_cache_dtype, tail_rows,
            config.cache if recall_enabled(config.cache) else None,
        )
        for rank in range(1, size)
    ]
    group = WorkerGroup(specs, par.timeout_s)
    logger.info(
        "tensor parallel: started ranks 1..%d (pids %s), meeting at 127.0.0.1:%d (%s)",
        size - 1, " ".join(str(p.pid) for p in group.procs), port, backend_for(device),
    )  # fmt: skip
    try:
        comm = Communicator.connect(0, size, port, par.timeout_s, devices[0])
    except Exception as exc:
        group.stop()
        raise TensorParallelError(f"the tensor-parallel ranks did not meet: {exc}") from exc
    return TensorParallel(layout, group, comm)
