"""What a decoder layer hands its attention backend besides the step's metadata.

    layer   AttentionLayer   the layer's index, head layout and fused-ops switch (static)
    qkv     [tokens, (H + 2 KVH) * D]  rows of q | k | v, split by its HeadLayout
    inputs  AttentionInputs  shared by every layer of one forward: token positions, the
                             RoPE tables (strata/models/rope.py), the paged KV pool over
                             all layers (strata/kv/cache.py)

Protocols, not imports: the attention package sits below models and kv.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


@dataclass(frozen=True)
class HeadLayout:
    """How a layer's fused QKV rows split: H query heads, then KVH key and KVH value
    heads, each `head_dim` wide."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    def split(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Views q [tokens, H, D], k and v [tokens, KVH, D] of qkv."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        return (
            q.view(-1, self.num_heads, self.head_dim),
            k.view(-1, self.num_kv_heads, self.head_dim),
            v.view(-1, self.num_kv_heads, self.head_dim),
        )


class AttentionLayer(Protocol):
    """One decoder layer's attention as its backend sees it.

    fused: the backend may fuse RoPE into the KV write (the model's set_fused_ops)."""

    layer_index: int
    heads: HeadLayout
    fused: bool


class Rotary(Protocol):
    """Rotary position embeddings: tables [max_positions, head_dim] and the torch path."""

    @property
    def cos(self) -> Tensor: ...

    @property
    def sin(self) -> Tensor: ...

    def __call__(self, positions: Tensor, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """q [tokens, H, D], k [tokens, KVH, D] -> both rotated."""
        ...


class KVPool(Protocol):
    """The paged KV cache over all layers.

    parts: one tensor per codec part, [layers, blocks, *part shape]. k, v: a raw pool's
    two parts, [layers, blocks, block_size, kv_heads, head_dim] (an error under a lossy
    codec, whose blocks only its CodedAttention reads).
    """

    @property
    def parts(self) -> Sequence[Tensor]: ...

    @property
    def k(self) -> Tensor: ...

    @property
    def v(self) -> Tensor: ...


@dataclass(frozen=True, slots=True)
class AttentionInputs:
    """One forward's attention inputs, the same for every layer."""

    positions: Tensor  # [tokens] RoPE position of each token
    rope: Rotary
    kv: KVPool

    def rotated_qkv(self, qkv: Tensor, heads: HeadLayout) -> tuple[Tensor, Tensor, Tensor]:
        """The torch path: q and k rotated, v as it is (shapes as in HeadLayout.split)."""
        q, k, v = heads.split(qkv)
        q, k = self.rope(self.positions, q, k)
        return q, k, v
