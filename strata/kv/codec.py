"""Block codecs: how the KV of a complete block is stored in the pool, selected by name.

    kv_cache_dtype   stored per block (one layer, one KV head)              vs bf16, D=64
    auto             K and V in the model dtype, unchanged (lossless)         1x
    fp8              float8 e4m3, one fp32 scale per token                    ~1.9x
    int8/int4/int2   KIVI: K per channel, V per token, in groups with scales  1.7x/2.9x/4.6x

Every lossy codec works on whole blocks. A block's tokens are first written in full
precision to a tail row (codec_tail.py); the step that completes the block encodes it
into the pool and frees the row. So the recent window, a sequence's last partial block,
is always exact, and K can be grouped along tokens (per channel, per block), as KIVI
does. Attention reads stored blocks decoded and the partial block from its tail row
(codec_step.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from strata.registry import Registry


@dataclass(frozen=True)
class BlockShape:
    """The shape of one block of one layer: [block_size, num_kv_heads, head_dim] for K and V."""

    block_size: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class PartSpec:
    """One pool tensor of a codec: [num_layers, num_blocks, *shape] of `dtype`."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


class BlockCodec(ABC):
    """Encodes and decodes the K/V of complete blocks of one layer.

    A codec stores a block as a fixed list of parts (`parts`); the pool holds one tensor
    per part, [num_layers, num_blocks, *part.shape]. `encode` maps k, v of n complete
    blocks ([n, block_size, kv_heads, head_dim]) to one tensor per part, [n, *part.shape];
    `decode` maps those back to k, v in the given dtype. A stored block's bytes (tiers,
    disk) are its parts in order, layer after layer.

    Invariant checked by the tests: every element of decode(encode(k, v)) is within
    `max_error` of the input, for the codec's stated bound.
    """

    name: str  # the kv_cache_dtype that selects it
    layout_name: str  # the codec field of stored blocks (tier BlockLayout)
    lossless: bool = False

    @abstractmethod
    def parts(self, shape: BlockShape, dtype: torch.dtype) -> list[PartSpec]:
        """The pool tensors of one block of one layer, for a model dtype."""

    @abstractmethod
    def encode(self, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        """k, v [n, block_size, kv_heads, head_dim] -> one tensor [n, *part.shape] per part."""

    @abstractmethod
    def decode(
        self, parts: list[torch.Tensor], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse of `encode`, up to the codec's rounding: (k, v) in `dtype`."""

    def bytes_per_block(self, num_layers: int, shape: BlockShape, dtype: torch.dtype) -> int:
        return num_layers * sum(p.nbytes for p in self.parts(shape, dtype))


class RawCodec(BlockCodec):
    """`auto`: K and V stored as they are, in the model dtype."""

    name = "auto"
    layout_name = "raw"
    lossless = True

    def parts(self, shape: BlockShape, dtype: torch.dtype) -> list[PartSpec]:
        kv = (shape.block_size, shape.num_kv_heads, shape.head_dim)
        return [PartSpec(kv, dtype), PartSpec(kv, dtype)]

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        return [k, v]

    def decode(
        self, parts: list[torch.Tensor], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return parts[0].to(dtype), parts[1].to(dtype)


CODECS: Registry[BlockCodec] = Registry("kv_cache_dtype", {
    "auto": RawCodec(),
    "fp8": "strata.kv.codec_fp8:FP8_CODEC",
    "int8": "strata.kv.codec_int:INT8_CODEC",
    "int4": "strata.kv.codec_int:INT4_CODEC",
    "int2": "strata.kv.codec_int:INT2_CODEC",
})  # fmt: skip


def get_codec(name: str) -> BlockCodec:
    """The codec selected by a kv_cache_dtype name."""
    return CODECS.get(name)


def codec_for_layout(layout_name: str) -> BlockCodec:
    """The codec whose stored blocks carry `layout_name` in their header."""
    for _, codec in CODECS.items():
        if codec.layout_name == layout_name:
            return codec
    raise ValueError(f"no KV codec stores blocks as {layout_name!r}")
