"""RoPE of a recall step's rows in one launch on CUDA.

A recall step keeps its rows' K and V for the recall sequences (attention.py), so it cannot
use the pool's fused RoPE-and-write. Unfused, RoPE is some ten elementwise launches a
layer. The fused kernel (ops/rope_kv.py) writes K and V wherever its slot mapping points:
here into a scratch [tokens, 1, kv_heads, D] "cache" of one-token blocks, slot t for row t.
Its rounding is the torch path's (rope.py), so outputs are bit-equal.
"""

from __future__ import annotations

import torch
from torch import Tensor

from strata.attention.layer_inputs import AttentionInputs, HeadLayout


def fused_rotated_qkv(
    qkv: Tensor, inputs: AttentionInputs, heads: HeadLayout
) -> tuple[Tensor, Tensor, Tensor]:
    """q, k rotated and v as they are ([tokens, H, D], [tokens, KVH, D] twice), as
    AttentionInputs.rotated_qkv returns them, from one kernel (CUDA; or Triton's interpreter)."""
    from strata.ops.rope_kv import rope_write_kv

    tokens, kvh, d = qkv.shape[0], heads.num_kv_heads, heads.head_dim
    k = qkv.new_empty((tokens, 1, kvh, d))
    v = torch.empty_like(k)
    rows = torch.arange(tokens, device=qkv.device)
    rope = inputs.rope
    q = rope_write_kv(
        qkv, inputs.positions, rope.cos, rope.sin, k, v, rows, heads.num_heads, kvh
    )
    return q, k.view(tokens, kvh, d), v.view(tokens, kvh, d)
