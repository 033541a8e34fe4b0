"""RecallPolicy: how a recall policy summarises blocks and scores them for a query.

A recall policy keeps every block (in the host store, host_store.py) and small
summaries on the GPU. Each decode step, per sparse layer and KV head, it scores the
sequence's middle blocks against the step's query; the top `budget_blocks` are attended
(fetched through the working set, working_set.py). Query heads of a GQA group share
one selection: their scores are summed. One instance serves one sequence.

`selects` False (full_offload): every middle block is attended, streamed from the host
each step; no summaries, no working set.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SummaryRoom:
    """What a sequence's summaries must cover: up to `max_blocks` middle blocks in each
    of `layers` sparse layers and `kv_heads` heads."""

    layers: int
    kv_heads: int
    max_blocks: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device | None = None  # None: the CPU

    def nbytes(self, per_block_vectors: int) -> int:
        """Bytes of `per_block_vectors` head_dim vectors per block, layer and head."""
        item = self.dtype.itemsize
        cells = self.layers * self.kv_heads * self.max_blocks * per_block_vectors
        return cells * self.head_dim * item


class RecallPolicy(ABC):
    name: str = ""
    selects: bool = True

    @abstractmethod
    def allocate(self, room: SummaryRoom) -> None:
        """Room for the summaries of a sequence's middle blocks, on room.device."""

    @abstractmethod
    def summarize(self, layer: int, first: int, keys: torch.Tensor) -> None:
        """Record middle blocks first, first+1, ... of sparse layer `layer` from their
        post-RoPE keys [kv_heads, n blocks, block_size, head_dim]."""

    @abstractmethod
    def scores(self, layer: int, q: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """[kv_heads, num_blocks] float32 scores of the first num_blocks middle blocks for
        one query q [kv_heads, group, head_dim] (post-RoPE)."""

    @staticmethod
    def summary_bytes(room: SummaryRoom) -> int:
        """GPU bytes `allocate(room)` takes."""
        return 0


class FullOffloadPolicy(RecallPolicy):
    """Attends every block: the lossless baseline of the recall store."""

    name = "full_offload"
    selects = False

    def allocate(self, room: SummaryRoom) -> None:
        return None

    def summarize(self, layer: int, first: int, keys: torch.Tensor) -> None:
        return None

    def scores(self, layer: int, q: torch.Tensor, num_blocks: int) -> torch.Tensor:
        raise TypeError("full_offload attends every block: it never scores")
