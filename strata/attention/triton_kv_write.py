"""Store a step's K and V into the paged cache in one Triton launch.

Token t goes to slot s = slot_mapping[t] (block s // block_size, offset s % block_size);
a negative slot (a padding row of a captured graph) is skipped. Values are cast to the
cache dtype on the way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["slot_ptr"])  # a view at any offset of the step upload
def _kv_write_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, num_heads,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_ct, stride_ch,
    HEADS_P: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token)
    if slot < 0:
        return
    offs_h = tl.arange(0, HEADS_P)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (offs_h < num_heads)[:, None]
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct
    dst_offs = dst + offs_h[:, None] * stride_ch + offs_d[None, :]
    k = tl.load(k_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask)
    v = tl.load(v_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask)
    tl.store(k_cache_ptr + dst_offs, k.to(k_cache_ptr.dtype.element_ty), mask)
    tl.store(v_cache_ptr + dst_offs, v.to(v_cache_ptr.dtype.element_ty), mask)


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v: [tokens, kv_heads, head_dim] (last dim contiguous) into [blocks, bs, heads, dim]."""
    if k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must share a layout")
    tokens, heads, dim = k.shape
    if tokens == 0:
        return
    _kv_write_kernel[(tokens,)](
        k, v, k_cache, v_cache, slot_mapping, heads,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        HEADS_P=triton.next_power_of_2(heads), HEAD_DIM=dim, BLOCK_SIZE=k_cache.shape[1],
        num_warps=4 if heads * dim >= 1024 else 1,
    )  # fmt: skip
