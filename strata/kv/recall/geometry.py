"""RecallGeometry: the shape of one recall sequence's KV, and the token regions of it.

    tokens   | sink | middle blocks ....................... | tail: window + open |
             |  b0  | b1 b2 ...                        b(t-1) | bt ...              |
             0      bs                                        tail_start        computed
    lives    | GPU  | host store (every head, every sparse   | GPU                 |
             |      | layer) + the policy's summaries on GPU |                     |

- Dense layers (the first `dense_layers`) keep every token on the GPU and attend fully.
- In sparse layers, block 0 is the sink once full; the tail is the last `window_blocks`
  full blocks and the open block. A block that leaves the tail goes to the host store.
- With shared prefixes the store also keeps every layer of each full prompt block
  (prefix_copy.py), so that a request reusing them rebuilds its GPU regions from there.
- A decode step attends the sink, the policy's picked middle blocks (at most
  `budget_blocks` per head, through the working set: the budget) and the tail; a prefill chunk
  attends every middle block (streamed from the host), so prefill is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from strata.kv.recall.dense_decode import DENSE_TILE
from strata.kv.recall.host_store import HostKVStore
from strata.kv.recall.working_set import WorkingSet

SINK_BLOCKS = 1  # the first block of every sparse layer stays on the GPU
WINDOW_BLOCKS = 2  # full blocks before the open one that stay on the GPU


@dataclass(frozen=True)
class RecallGeometry:
    num_layers: int
    dense_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    window_blocks: int = WINDOW_BLOCKS
    landmark_tokens: int = 8  # shadowkv's chunk (capped at one block)
    quest_page_tokens: int = 0  # quest's min/max page (capped at one block); 0: the block
    working_set_factor: int = 1  # working-set slots per picked block (working_set.py)
    prefetch: bool = False  # pages fetch each sparse layer's predicted picks a layer early

    def __post_init__(self) -> None:
        if not 0 <= self.dense_layers <= self.num_layers:
            raise ValueError(
                f"kv_recall_dense_layers must be in [0, {self.num_layers}], got {self.dense_layers}"
            )

    @property
    def sparse_layers(self) -> int:
        return self.num_layers - self.dense_layers

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def tail_capacity(self) -> int:
        return (self.window_blocks + 1) * self.block_size

    def budget_blocks(self, budget_tokens: int) -> int:
        """Middle blocks a decode step picks per head for a budget of picked tokens; the
        sink, the window and the open block are attended besides them. At least one."""
        return max(1, budget_tokens // self.block_size)

    def max_blocks(self, max_tokens: int) -> int:
        return -(-max_tokens // self.block_size)

    @staticmethod
    def room_blocks(host_blocks: int) -> int:
        """The middle blocks a sequence's summaries and slot tables cover: host_blocks
        rounded up to a step of an eighth of its power of two, at most 1/8 more, so that
        sequences of nearby lengths share a page (page.py)."""
        step = 1 << max(0, host_blocks.bit_length() - 4)
        return -(-host_blocks // step) * step

    @staticmethod
    def dense_tokens(max_tokens: int) -> int:
        """Tokens a dense layer's buffers hold: max_tokens rounded up to whole pages of the
        CUDA decode kernel's view (dense_decode.py)."""
        return -(-max_tokens // DENSE_TILE) * DENSE_TILE

    def dense_bytes(self, max_tokens: int) -> int:
        per_token = 2 * self.dense_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize
        return per_token * self.dense_tokens(max_tokens)

    def resident_bytes(self) -> int:
        per_token = 2 * self.sparse_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize
        return (SINK_BLOCKS * self.block_size + self.tail_capacity) * per_token

    def working_set_slots(self, budget_blocks: int) -> int:
        """Working-set slots per layer and head of a sequence picking budget_blocks."""
        return budget_blocks * self.working_set_factor

    def working_set_bytes(self, slots: int) -> int:
        return WorkingSet.nbytes_for(
            self.sparse_layers, self.num_kv_heads, slots, self.block_size, self.head_dim,
            self.dtype,
        )  # fmt: skip

    def host_layers(self, shared: bool) -> int:
        """Layers a host-store slot spans: the sparse ones, and with shared prefixes the
        dense ones too (a published block then holds every layer: prefix_copy.py)."""
        return self.num_layers if shared else max(1, self.sparse_layers)

    def host_layer(self, layer: int) -> int:
        """The store's layer of model layer `layer`: sparse layers first (sparse layer s
        is store layer s), then the dense ones."""
        if layer < self.dense_layers:
            return self.sparse_layers + layer
        return layer - self.dense_layers

    def host_slot_bytes(self, shared: bool = False) -> int:
        """Bytes of a host-store slot: one block's keys, or its values."""
        return HostKVStore.slot_bytes(
            self.host_layers(shared), self.num_kv_heads, self.block_size, self.head_dim,
            self.dtype,
        )  # fmt: skip
