"""The KV tensors: per codec part, one pool over all layers, indexed by block id.

    auto (lossless): k, v = parts: [layers, num_blocks, block_size, kv_heads, head_dim]
    lossy codecs:    parts[i]: [layers, num_blocks, *codec part shape]  (codec.py)
                     tails.k, tails.v: [layers, tail rows, block_size, kv_heads, head_dim]
                     written and read by CodedAttention (coded_attention.py)

Slot s = block_id * block_size + offset addresses one token's K/V in a layer.
"""

from __future__ import annotations

import torch

from strata.config import ModelConfig
from strata.kv.codec import BlockCodec, BlockShape, RawCodec
from strata.kv.codec_tail import TailStore


class KVCache:
    def __init__(
        self,
        model: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        codec: BlockCodec | None = None,
        tail_rows: int = 0,
    ) -> None:
        self.codec = codec or RawCodec()
        self.shape = BlockShape(block_size, model.num_kv_heads, model.head_dim)
        self.num_layers = model.num_layers
        self.dtype = dtype
        # Zeroed, not empty: attention masks padded slots, but 0 * NaN garbage would be NaN.
        self.parts = [
            torch.zeros((model.num_layers, num_blocks, *p.shape), dtype=p.dtype, device=device)
            for p in self.codec.parts(self.shape, dtype)
        ]
        self.tails: TailStore | None = None
        if not self.codec.lossless:
            block = (block_size, model.num_kv_heads, model.head_dim)
            self.tails = TailStore(tail_rows, model.num_layers, block, dtype, device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = device

    @property
    def k(self) -> torch.Tensor:
        """The K pool [layers, blocks, block_size, kv_heads, head_dim] (lossless codec only)."""
        return self._raw(0)

    @property
    def v(self) -> torch.Tensor:
        return self._raw(1)

    def _raw(self, i: int) -> torch.Tensor:
        if not self.codec.lossless:
            raise TypeError(
                f"the {self.codec.name} KV cache stores coded blocks: CodedAttention reads them"
            )
        return self.parts[i]

    @staticmethod
    def bytes_per_block(
        model: ModelConfig, block_size: int, dtype: torch.dtype, codec: BlockCodec | None = None
    ) -> int:
        shape = BlockShape(block_size, model.num_kv_heads, model.head_dim)
        return (codec or RawCodec()).bytes_per_block(model.num_layers, shape, dtype)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers, as the pool stores it."""
        return self.codec.bytes_per_block(self.num_layers, self.shape, self.dtype)

    @property
    def nbytes(self) -> int:
        pools = sum(p.numel() * p.element_size() for p in self.parts)
        return pools + (self.tails.nbytes if self.tails is not None else 0)
