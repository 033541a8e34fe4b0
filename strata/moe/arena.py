"""One GPU allocation shared by the KV block pool and the expert slots.

The arena is block-major, so the top of it is one contiguous region whatever the
number of layers:

    flat: [ block 0 | block 1 | ... | block limit-1 | ......... | slot 1 | slot 0 ]
            each block = [layers, K/V, block_size, kv_heads, head_dim]     ^ top
            <------------- KV blocks in use ----------->  <- expert slots ->

- Block b (all layers, K and V) is elements [b*B, (b+1)*B); B = block_numel.
- Expert slot j is elements [top - (j+1)*S, top - j*S); S = expert_numel.
- Blocks at or above `limit` are withdrawn from the KV pool; slots [0, slots_above(limit))
  fit entirely above the limit. Moving the limit down gives experts more slots, up gives
  KV more blocks; nothing is reallocated.

The KV tensors are views: k[layer] is [num_blocks, block_size, kv_heads, head_dim] with
a block stride of layers * 2 * block_size * kv_heads * head_dim (attention backends take
strides, and head_dim stays contiguous).
"""

from __future__ import annotations

import torch

from strata.config import ModelConfig
from strata.kv.cache import KVCache
from strata.kv.codec import BlockShape, RawCodec


class ArenaKVCache(KVCache):
    """A KVCache whose K/V are block-major views of an arena."""

    def __init__(self, blocks: torch.Tensor, block_size: int) -> None:
        # blocks: [num_blocks, layers, 2, block_size, kv_heads, head_dim]; raw codec only
        self.codec = RawCodec()
        self.shape = BlockShape(block_size, blocks.shape[4], blocks.shape[5])
        self.num_layers = blocks.shape[1]
        self.dtype = blocks.dtype
        self.parts = [blocks[:, :, 0].transpose(0, 1), blocks[:, :, 1].transpose(0, 1)]
        self.tails = None
        self.num_blocks = blocks.shape[0]
        self.block_size = block_size
        self.device = blocks.device


class ExpertArena:
    def __init__(
        self,
        model: ModelConfig,
        num_blocks: int,
        block_size: int,
        expert_numel: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.block_numel = 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim
        self.expert_numel = expert_numel
        self.num_blocks = num_blocks
        self.total_numel = num_blocks * self.block_numel
        # Zeroed: attention reads masked padding slots, and 0 * NaN garbage would be NaN.
        self.flat = torch.zeros(self.total_numel, dtype=dtype, device=device)
        shape = (num_blocks, model.num_layers, 2, block_size, model.num_kv_heads, model.head_dim)
        self.kv_cache = ArenaKVCache(self.flat.view(shape), block_size)
        self.element_size = self.flat.element_size()

    @staticmethod
    def blocks_for(
        model: ModelConfig, block_size: int, kv_blocks: int, expert_slots: int, expert_numel: int
    ) -> int:
        """Arena blocks that hold `kv_blocks` KV blocks below `expert_slots` slots."""
        block_numel = 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim
        return kv_blocks + -(-expert_slots * expert_numel // block_numel)

    def slots_above(self, limit: int) -> int:
        """Expert slots that fit entirely in blocks [limit, num_blocks)."""
        return (self.num_blocks - limit) * self.block_numel // self.expert_numel

    def limit_for_slots(self, num_slots: int) -> int:
        """The highest block limit leaving room for `num_slots` slots above it."""
        free_top = self.total_numel - num_slots * self.expert_numel
        if free_top < 0:
            raise ValueError(f"{num_slots} expert slots do not fit in the arena")
        return free_top // self.block_numel

    def max_slots(self) -> int:
        return self.total_numel // self.expert_numel

    def slot(self, j: int) -> torch.Tensor:
        end = self.total_numel - j * self.expert_numel
        return self.flat[end - self.expert_numel : end]

    def zero_blocks(self, lo: int, hi: int) -> None:
        """Clear blocks [lo, hi) before the KV pool takes them back from the experts."""
        self.flat[lo * self.block_numel : hi * self.block_numel].zero_()

    @property
    def nbytes(self) -> int:
        return self.total_numel * self.element_size
