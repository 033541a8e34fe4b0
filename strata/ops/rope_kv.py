"""RoPE applied on the way into the KV cache: one pass over the fused QKV projection.

    qkv [tokens, (H + 2 KVH) * D] --> q_rot [tokens, H, D]           (returned)
                                  --> k_rot, v at slot_mapping[t]    (cache; slot < 0 skips)

Unfused, the same work is ~10 elementwise launches per layer (gather cos/sin, two casts,
rotate_half as neg + cat, three muls, two adds) plus the KV write. Rounding follows the
torch path (rope.py): cos/sin cast to the input dtype, then q*cos and rotate_half(q)*sin
each rounded before their sum. CUDA only; callers keep the torch path elsewhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope(x, x_rot, cos, sin):
    a = (x * cos).to(x.dtype)
    b = (x_rot * sin).to(x.dtype)
    return (a + b).to(x.dtype)


@triton.jit(do_not_specialize=["pos_ptr", "slot_ptr"])  # views at any offset of the upload
def _rope_kv_kernel(
    qkv_ptr, pos_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_t, stride_cos, stride_cb, stride_ct, stride_ch,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEADS_P: tl.constexpr, KV_P: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    half: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, HEAD_DIM)
    d_rot = (d + half) % HEAD_DIM  # rotate_half: [-x2, x1]
    sign = tl.where(d < half, -1.0, 1.0)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    dtype = q_out_ptr.dtype.element_ty
    cos = tl.load(cos_ptr + pos * stride_cos + d).to(dtype)[None, :]
    sin = tl.load(sin_ptr + pos * stride_cos + d).to(dtype)[None, :]
    row = qkv_ptr + t * stride_t

    h = tl.arange(0, HEADS_P)[:, None]
    hm = h < HEADS
    q = tl.load(row + h * HEAD_DIM + d[None, :], mask=hm, other=0.0)
    q_rot = tl.load(row + h * HEAD_DIM + d_rot[None, :], mask=hm, other=0.0)
    q_rot = (q_rot * sign[None, :]).to(dtype)
    tl.store(q_out_ptr + t * HEADS * HEAD_DIM + h * HEAD_DIM + d[None, :],
             _rope(q, q_rot, cos, sin), mask=hm)  # fmt: skip

    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        g = tl.arange(0, KV_P)[:, None]
        gm = g < KV_HEADS
        k_base = row + HEADS * HEAD_DIM + g * HEAD_DIM
        k = tl.load(k_base + d[None, :], mask=gm, other=0.0)
        k_rot = tl.load(k_base + d_rot[None, :], mask=gm, other=0.0)
        k_rot = (k_rot * sign[None, :]).to(dtype)
        v = tl.load(k_base + KV_HEADS * HEAD_DIM + d[None, :], mask=gm, other=0.0)
        dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct
        dst_offs = dst + g * stride_ch + d[None, :]
        k_out = _rope(k, k_rot, cos, sin).to(k_cache_ptr.dtype.element_ty)
        tl.store(k_cache_ptr + dst_offs, k_out, mask=gm)
        tl.store(v_cache_ptr + dst_offs, v.to(v_cache_ptr.dtype.element_ty), mask=gm)


def rope_write_kv(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """Rotate q and k, store k and v in the cache; returns q_rot [tokens, heads, head_dim].

    qkv rows hold q | k | v contiguously; caches are [blocks, block_size, kv_heads, D]."""
    tokens = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    if qkv.stride(-1) != 1 or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("rope_write_kv needs contiguous head_dim in qkv and the caches")
    q_out = torch.empty((tokens, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if tokens:
        _rope_kv_kernel[(tokens,)](
            qkv, positions, cos, sin, q_out, k_cache, v_cache, slot_mapping,
            qkv.stride(0), cos.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            HEADS=num_heads, KV_HEADS=num_kv_heads,
            HEADS_P=triton.next_power_of_2(num_heads), KV_P=triton.next_power_of_2(num_kv_heads),
            HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
            num_warps=4,
        )  # fmt: skip
    return q_out
