"""Communicator: the collectives a sharded model calls, over one torch.distributed group.

The group is a process-group object of its own (a TCPStore rendezvous on 127.0.0.1), not
torch.distributed's global default group: several engines may live in one process, one
after another or side by side. Every collective waits at most the group's timeout, so a
rank that hangs fails the others with an error instead of blocking them forever.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Backend


def backend_for(device: torch.device) -> str:
    """nccl on CUDA, gloo on CPU; ValueError when this torch lacks it."""
    name = "nccl" if device.type == "cuda" else "gloo"
    available = dist.is_available() and (
        dist.is_nccl_available() if name == "nccl" else dist.is_gloo_available()
    )
    if not available:
        raise ValueError(
            f"tensor parallelism on {device.type} needs the torch.distributed {name} backend, "
            f"which this torch build ({torch.__version__}) does not have"
        )
    return name


class Communicator:
    """All-reduce (sum, in place), gather to rank 0 and broadcast from rank 0 for rank
    `rank` of `size`; counts the time spent in all-reduces (on CUDA: the host time to
    enqueue them)."""

    def __init__(self, rank: int, size: int, group: Any, device: torch.device) -> None:
        # group: a c10d Backend (ProcessGroupGloo / ProcessGroupNCCL); torch's stubs do not
        # declare the collectives of Backend, hence Any.
        self.rank, self.size = rank, size
        self.group = group
        self.device = device
        self.allreduce_seconds = 0.0
        self.num_allreduces = 0

    @classmethod
    def connect(
        cls, rank: int, size: int, port: int, timeout_s: float, device: torch.device
    ) -> Communicator:
        """Meet the other ranks at 127.0.0.1:port (rank 0 serves the store)."""
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(
            "127.0.0.1", port, size, rank == 0, timeout=timeout,
            wait_for_workers=True,
        )  # fmt: skip
        group: Backend
        if backend_for(device) == "nccl":
            from torch._C._distributed_c10d import ProcessGroupNCCL

            options = ProcessGroupNCCL.Options()
            options._timeout = timeout
            group = ProcessGroupNCCL(store, rank, size, options)
        else:
            group = dist.ProcessGroupGloo(store, rank, size, timeout)
        return cls(rank, size, group, device)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place; returns it."""
        start = time.perf_counter()
        self.group.allreduce([tensor]).wait()
        self.allreduce_seconds += time.perf_counter() - start
        self.num_allreduces += 1
        return tensor

    def gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0: every rank's `tensor` concatenated along the last dim; other ranks get
        their own tensor back."""
        tensor = tensor.contiguous()
        parts = [[torch.empty_like(tensor) for _ in range(self.size)]] if self.rank == 0 else []
        options = dist.GatherOptions()
        options.rootRank = 0
        self.group.gather(parts, [tensor], options).wait()
        return torch.cat(parts[0], dim=-1) if parts else tensor

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` into every rank's (same shape and dtype), in place."""
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self.group.broadcast([tensor], options).wait()
        return tensor
