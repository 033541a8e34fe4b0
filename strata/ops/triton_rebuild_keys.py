"""Triton kernel: ShadowKV's rebuilt keys, written straight into the working-set slots.

For every moved entry (row r, head h, pick i) with mask[r, h, i]:

    b = blocks[r, h, i], s = slots[r, h, i]
    out[r, h, s] = outlier_keys[r, h, j]                   if outliers[r, h, j] == b (first j)
                 = RoPE(factors[r, b*bs : (b+1)*bs] @ basis[r, :, head_cols(h)])   otherwise

with RoPE at positions (b + sink_blocks) * bs + t as rotate-half: lo' = lo*cos - hi*sin,
hi' = hi*cos + lo*sin. The low-rank product is rounded to the keys' dtype before RoPE, as
the torch path (ShadowKVPolicy.rebuilt_keys) rounds its matmul. Entries not masked keep
their slots. One program per (r, h, i): one block of bs tokens, both halves of the head.

This replaces about 25 kernels a layer (gathers of factors, RoPE tables and outlier keys,
elementwise RoPE, a gather and scatter into the slots) with one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

K_CHUNK = 32  # rank columns per dot


@triton.jit
def _rebuild_keys_kernel(
    factors_ptr, basis_ptr, cos_ptr, sin_ptr, outliers_ptr, outlier_keys_ptr,
    blocks_ptr, slots_ptr, mask_ptr, heads_ptr, out_ptr,
    factors_row, basis_row, outliers_row, outlier_keys_row, out_row,
    KVH, PICKS, NUM_OUT, RANK, BASIS_COLS, NUM_SLOTS, SINK_BLOCKS,
    BS: tl.constexpr, D: tl.constexpr, OUT_POW2: tl.constexpr, K_CHUNK: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    lane = tl.program_id(0)  # (r * KVH + h) * PICKS + i
    if tl.load(mask_ptr + lane) != 0:
        r = lane // (KVH * PICKS)
        h = lane // PICKS % KVH
        block = tl.load(blocks_ptr + lane)
        slot = tl.load(slots_ptr + lane)
        t = tl.arange(0, BS)
        half = tl.arange(0, D // 2)
        dst = out_ptr + r * out_row + (h * NUM_SLOTS + slot) * BS * D
        o = tl.arange(0, OUT_POW2)
        kept = tl.load(outliers_ptr + r * outliers_row + h * NUM_OUT + o, mask=o < NUM_OUT,
                       other=-1)  # fmt: skip
        first = tl.min(tl.where(kept == block, o, OUT_POW2))
        # (names bound in both branches must keep one type: the compiler merges them)
        if first < OUT_POW2:  # an outlier: its exact keys
            src = outlier_keys_ptr + r * outlier_keys_row + (h * NUM_OUT + first) * BS * D
            whole = t[:, None] * D + tl.arange(0, D)[None, :]
            tl.store(dst + whole, tl.load(src + whole))
        else:
            head = tl.load(heads_ptr + h)
            lo = tl.zeros((BS, D // 2), dtype=tl.float32)
            hi = tl.zeros((BS, D // 2), dtype=tl.float32)
            rows = factors_ptr + r * factors_row + (block * BS + t[:, None]) * RANK
            cols = basis_ptr + r * basis_row + head * D + half[None, :]
            for k0 in range(0, RANK, K_CHUNK):
                k = k0 + tl.arange(0, K_CHUNK)
                f = tl.load(rows + k[None, :], mask=k[None, :] < RANK, other=0.0)
                b_lo = tl.load(cols + k[:, None] * BASIS_COLS, mask=k[:, None] < RANK, other=0.0)
                b_hi = tl.load(cols + D // 2 + k[:, None] * BASIS_COLS, mask=k[:, None] < RANK,
                               other=0.0)  # fmt: skip
                lo = tl.dot(f, b_lo, lo, input_precision=PRECISION)
                hi = tl.dot(f, b_hi, hi, input_precision=PRECISION)
            out_dtype = out_ptr.dtype.element_ty
            lo = lo.to(out_dtype).to(tl.float32)
            hi = hi.to(out_dtype).to(tl.float32)
            table = ((block + SINK_BLOCKS) * BS + t[:, None]) * D + half[None, :]
            cos_lo = tl.load(cos_ptr + table).to(tl.float32)
            cos_hi = tl.load(cos_ptr + table + D // 2).to(tl.float32)
            sin_lo = tl.load(sin_ptr + table).to(tl.float32)
            sin_hi = tl.load(sin_ptr + table + D // 2).to(tl.float32)
            grid = t[:, None] * D + half[None, :]
            tl.store(dst + grid, (lo * cos_lo - hi * sin_lo).to(out_dtype))
            tl.store(dst + grid + D // 2, (hi * cos_hi + lo * sin_hi).to(out_dtype))


def fits(block_size: int, head_dim: int) -> bool:
    """Whether the kernel takes this geometry (powers of two; tl.dot needs 16 rows and
    16-wide halves)."""
    pow2 = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
    return pow2(block_size) and pow2(head_dim) and block_size >= 16 and head_dim >= 32


def rebuild_keys(
    factors: torch.Tensor, basis: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    outliers: torch.Tensor, outlier_keys: torch.Tensor, blocks: torch.Tensor,
    slots: torch.Tensor, mask: torch.Tensor, heads: torch.Tensor, out: torch.Tensor,
    sink_blocks: int,
) -> None:  # fmt: skip
    """See the module docstring. With leading rows R (a page; R = 1 for one sequence):
    factors [R, blocks * bs, rank], basis [R, rank, model kv_heads * dim], cos and sin
    [positions, dim], outliers [R, kvh, n], outlier_keys [R, kvh, n, bs, dim], blocks,
    slots and mask [R, kvh, picks], heads [kvh] (each head's index among the model's),
    out [R, kvh, num_slots, bs, dim] (the working set's keys of one layer)."""
    rows, kvh, picks = blocks.shape
    _, _, num_slots, bs, dim = out.shape
    if not fits(bs, dim):
        raise ValueError(f"rebuild_keys needs power-of-two blocks >= 16 and dims >= 32, "
                         f"got {bs} x {dim}")  # fmt: skip
    for name, x in (("factors", factors), ("basis", basis), ("outlier_keys", outlier_keys),
                    ("out", out), ("cos", cos[None]), ("sin", sin[None])):  # fmt: skip
        if not x[0].is_contiguous():
            raise ValueError(f"rebuild_keys needs each row of {name} contiguous")
    n = outliers.shape[-1]
    outliers, blocks, slots, heads = (x.contiguous() for x in (outliers, blocks, slots, heads))
    moved = mask.contiguous().view(torch.uint8)
    precision = "ieee" if out.dtype == torch.float32 else "tf32"
    _rebuild_keys_kernel[(rows * kvh * picks,)](
        factors, basis, cos, sin, outliers, outlier_keys, blocks, slots, moved, heads, out,
        factors.stride(0), basis.stride(0), outliers.stride(0), outlier_keys.stride(0),
        out.stride(0),
        kvh, picks, n, factors.shape[-1], basis.shape[-1], num_slots, sink_blocks,
        BS=bs, D=dim, OUT_POW2=triton.next_power_of_2(max(n, 1)), K_CHUNK=K_CHUNK,
        PRECISION=precision,
    )  # fmt: skip
