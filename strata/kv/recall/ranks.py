"""HeadShard: a tensor-parallel rank's KV heads, as its recall store sees them.

Each rank's store holds its own KV heads (strata/models/tp/layout.py):

    kv_heads >= ranks   rank r: heads [r*l, (r+1)*l), l = kv_heads / ranks
    kv_heads <  ranks   rank r: head r // replicas alone, replicas = ranks / kv_heads

Most of a recall policy is per KV head, and so per rank. Two things are not, and every
rank joins them with one all-reduce, in the same order (ranks run the same layers over
the same chunks, so their calls line up):
- a replicated head's GQA group is split over its replicas: a selection takes the max
  over the group, so the replicas take the max of their parts (`max_over_replicas`);
- a summary over every KV head of a layer (shadowkv's basis) needs every head's rows
  (`gather_heads`).
Both give each rank exactly what one rank holding every head computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class AllReduce(Protocol):
    """The ranks' sum (models/tp/comm.Communicator is one)."""

    rank: int
    size: int

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place; returns it."""
        ...


@dataclass(frozen=True)
class HeadShard:
    comm: AllReduce
    model_kv_heads: int  # the whole model's

    @property
    def replicas(self) -> int:
        """Ranks holding each KV head."""
        return max(self.comm.size // self.model_kv_heads, 1)

    def _everyone(self, part: torch.Tensor) -> torch.Tensor:
        """[ranks, *part.shape]: every rank's `part`, in rank order (a sum of zeros and
        one rank's values is those values exactly)."""
        parts = part.new_zeros((self.comm.size, *part.shape))
        parts[self.comm.rank] = part
        return self.comm.all_reduce(parts)

    def max_over_replicas(self, scores: torch.Tensor) -> torch.Tensor:
        """scores [this rank's heads, n]: the max over the ranks holding the same heads."""
        if self.replicas == 1:
            return scores
        first = self.comm.rank // self.replicas * self.replicas
        return self._everyone(scores)[first : first + self.replicas].amax(dim=0)

    def gather_heads(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [n, this rank's heads * dim] -> [n, every head * dim], heads in order."""
        if self.comm.size == 1:
            return rows
        parts = self._everyone(rows)[:: self.replicas]  # one rank per head group
        return parts.permute(1, 0, 2).reshape(rows.shape[0], -1)

    def own_heads(self, local_heads: int) -> slice:
        """This rank's KV heads among the model's."""
        first = self.comm.rank // self.replicas * local_heads
        return slice(first, first + local_heads)
