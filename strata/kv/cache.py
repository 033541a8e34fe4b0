"""The KV tensors: one K and one V pool per layer, indexed by block id.

    k[layer]: [num_blocks, block_size, num_kv_heads, head_dim]   (v likewise)

Slot s = block_id * block_size + offset addresses one token's K/V in a layer.
"""

from __future__ import annotations

import torch

from strata.config import ModelConfig


class KVCache:
    def __init__(
        self,
        model: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (model.num_layers, num_blocks, block_size, model.num_kv_heads, model.head_dim)
        # Zeroed, not empty: attention masks padded slots, but 0 * NaN garbage would be NaN.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return model.kv_bytes_per_token * block_size * element

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
