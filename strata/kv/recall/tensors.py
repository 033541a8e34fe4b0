"""SequenceTensors: a recall sequence's own GPU tensors besides its dense layers, working
set and summaries; or, over a page's whole buffers, those of every row (buffers.py).

    sink_k, sink_v   [layers, (rows,) kv_heads, block_size, dim]     block 0 of each layer
    tail_k, tail_v   [layers, (rows,) kv_heads, tail_capacity, dim]  the window + open block
    held, middle     [(rows)]        a selecting decode step's counts: tokens the tail
                                     holds before it, middle blocks that exist
    key_slots        [(rows,) room]  middle block j's keys live in host slot key_slots[j],
    value_slots      [(rows,) room]  its values in value_slots[j] (host_store.py)
    bytes_fetched, blocks_attended  [(rows)]   counters, on the device
    bytes_prefetched  [(rows)]                 bytes a cross-layer prefetch moved
    prefetch          [(rows,) 2, layers]      per sparse layer: picks the prefetch had
                                               guessed, and picks (page_decode.py)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from strata.kv.recall.buffers import Buffers
from strata.kv.recall.geometry import SINK_BLOCKS, RecallGeometry


@dataclass(frozen=True)
class SequenceTensors:
    sink_k: torch.Tensor
    sink_v: torch.Tensor
    tail_k: torch.Tensor
    tail_v: torch.Tensor
    held: torch.Tensor
    middle: torch.Tensor
    key_slots: torch.Tensor
    value_slots: torch.Tensor
    bytes_fetched: torch.Tensor
    blocks_attended: torch.Tensor
    bytes_prefetched: torch.Tensor
    prefetch: torch.Tensor

    @classmethod
    def of(cls, buffers: Buffers, g: RecallGeometry, room: int) -> SequenceTensors:
        kvh, d, dt = g.num_kv_heads, g.head_dim, g.dtype
        sink = (g.sparse_layers, kvh, SINK_BLOCKS * g.block_size, d)
        tail = (g.sparse_layers, kvh, g.tail_capacity, d)

        def layered(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            return buffers.tensor(name, shape, dt, layered=True)

        def count(name: str, shape: tuple[int, ...] = ()) -> torch.Tensor:
            return buffers.tensor(name, shape, torch.long, layered=False)

        return cls(
            layered("sink_k", sink), layered("sink_v", sink), layered("tail_k", tail),
            layered("tail_v", tail), count("held"), count("middle"),
            count("key_slots", (room,)), count("value_slots", (room,)), count("bytes_fetched"),
            count("blocks_attended"), count("bytes_prefetched"),
            count("prefetch", (2, g.sparse_layers)),
        )  # fmt: skip
