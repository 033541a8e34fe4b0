"""Paged decode attention with split-K (flash-decoding) in Triton.

One program per (decode row, KV head, split). The G query heads of a KV head share
each K/V tile load (a [G, head_dim] x [head_dim, BLOCK_N] product, G padded to 16).
Split s of a row with L context tokens covers keys

    [s * chunk, min((s + 1) * chunk, L)),  chunk = ceil(ceil(L / S) / BLOCK_N) * BLOCK_N

so the grid (rows, kv_heads, S) never depends on L: splits past the end exit at once.
S is a runtime argument (no recompile per split count), chosen from host ints only
(`choose_num_splits`). With S > 1 each split writes its normalised partial output and
log2-sum-exp to fp32 scratch, and a second kernel merges the splits of each (row, head);
with S == 1 the split kernel writes the output directly. A row with L == 0 (graph
padding) gets zeros.

H200, Llama-3-8B shape (8 KV heads, head_dim 128, bf16), fraction of copy bandwidth:
batch 1 at 4k 32%, at 32k 79%; batch 8 at 8k 90%; batch 64 at 1k 94%. Short contexts
are bound by the two launches (~5 us a layer inside a graph).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from strata.attention.triton_meta import DecodeMetadata

LOG2E = 1.4426950408889634
MAX_SPLITS = 64
PROGRAMS_PER_SM = 4


@triton.jit
def _split_chunk(seq_len, num_splits, BLOCK_N: tl.constexpr):
    """Keys per split: ceil(seq_len / num_splits) rounded up to whole tiles."""
    per_split = (seq_len + num_splits - 1) // num_splits
    return (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N


# Per-step values (split count, table width, metadata views at any offset) are not
# specialised on: one compiled variant serves every step.
@triton.jit(
    do_not_specialize=[
        "query_rows_ptr",
        "seq_lens_ptr",
        "block_tables_ptr",
        "num_splits",
        "stride_bt",
    ]
)
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    query_rows_ptr, seq_lens_ptr, block_tables_ptr,
    qk_scale, num_heads, num_splits,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_bt,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + row)
    chunk = _split_chunk(seq_len, num_splits, BLOCK_N)
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    offs_g = tl.arange(0, GROUP_P)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    q_row = tl.load(query_rows_ptr + row).to(tl.int64)
    out_ptrs = out_ptr + q_row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    if start >= end:
        if DIRECT:  # a padding row, and no merge kernel runs: write zeros
            zeros = tl.full([GROUP_P, HEAD_DIM], 0.0, dtype=out_ptr.dtype.element_ty)
            tl.store(out_ptrs, zeros, mask=g_mask[:, None])
        return

    q_ptrs = q_ptr + q_row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=g_mask[:, None], other=0.0)
    table = block_tables_ptr + row.to(tl.int64) * stride_bt
    m = tl.full([GROUP_P], float("-inf"), dtype=tl.float32)
    l_sum = tl.full([GROUP_P], 0.0, dtype=tl.float32)
    acc = tl.full([GROUP_P, HEAD_DIM], 0.0, dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        k_mask = pos < end
        block = tl.load(table + pos // BLOCK_SIZE, mask=k_mask, other=0).to(tl.int64)
        offs = block * stride_kb + (pos % BLOCK_SIZE) * stride_kt + kv_head * stride_kh
        k = tl.load(k_ptr + offs[:, None] + offs_d[None, :], mask=k_mask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(k_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: each tile has a key (n0 < end)
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + offs[:, None] + offs_d[None, :], mask=k_mask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    acc = acc / l_sum[:, None]
    if DIRECT:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        # scratch: part_out [rows, heads, S, D], part_lse [rows, heads, S]
        base = (row.to(tl.int64) * num_heads + heads) * num_splits + split
        tl.store(part_lse_ptr + base, m + tl.math.log2(l_sum), mask=g_mask)
        part_ptrs = part_out_ptr + base[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(part_ptrs, acc, mask=g_mask[:, None])


@triton.jit(do_not_specialize=["query_rows_ptr", "seq_lens_ptr", "num_splits"])
def _decode_merge_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, query_rows_ptr, seq_lens_ptr,
    num_heads, num_splits, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS_P: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + row)
    chunk = _split_chunk(seq_len, num_splits, BLOCK_N)
    active = (seq_len + chunk - 1) // tl.maximum(chunk, 1)  # splits that wrote; 0 for padding
    offs_s = tl.arange(0, SPLITS_P)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < active
    base = (row.to(tl.int64) * num_heads + head) * num_splits + offs_s
    lse = tl.load(part_lse_ptr + base, mask=s_mask, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.where(s_mask, tl.math.exp2(lse - top), 0.0)
    parts = tl.load(
        part_out_ptr + base[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None], other=0.0
    )
    total = tl.sum(weight, 0)
    merged = tl.sum(parts * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    q_row = tl.load(query_rows_ptr + row).to(tl.int64)
    tl.store(
        out_ptr + q_row * stride_ot + head * stride_oh + offs_d,
        merged.to(out_ptr.dtype.element_ty),
    )


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(
    num_rows: int, kv_heads: int, max_seq_len: int, block_n: int, device: torch.device
) -> int:
    """Splits per row: about PROGRAMS_PER_SM programs per multiprocessor, each split at
    least one tile, at most MAX_SPLITS (H200 sweep: ~4 programs/SM of 64-key tiles was
    best from batch 1 at 32k to batch 64 at 1k).

    A function of host ints only, so a graph captured with a fixed bound keeps its grid.
    """
    want = PROGRAMS_PER_SM * _num_sms(device) // max(1, num_rows * kv_heads)
    return max(1, min(want, max_seq_len // block_n, MAX_SPLITS))


@dataclass(frozen=True)
class DecodeTile:
    block_n: int  # keys per inner step
    num_warps: int
    num_stages: int


def default_tile(head_dim: int, dtype: torch.dtype) -> DecodeTile:
    """Hopper choice (H200 sweep at head_dim 128); fp32 tiles are half as wide."""
    block_n = 64 if head_dim <= 128 else 32
    if dtype == torch.float32:
        block_n //= 2
    return DecodeTile(block_n, 4, 3)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    meta: DecodeMetadata,
    block_size: int,
    scale: float,
    num_splits: int | None = None,
    tile: DecodeTile | None = None,
) -> None:
    """Write out[query_rows] = attention of q[query_rows] over each row's paged context."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[2]
    group = num_heads // kv_heads
    n = meta.num_rows
    tile = tile or default_tile(head_dim, q.dtype)
    if num_splits is None:
        num_splits = choose_num_splits(n, kv_heads, meta.max_seq_len, tile.block_n, q.device)
    part_out = part_lse = out  # unused when num_splits == 1
    if num_splits > 1:
        part_out = torch.empty(
            (n, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
        )
        part_lse = torch.empty((n, num_heads, num_splits), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(n, kv_heads, num_splits)](
        q, k_cache, v_cache, out, part_out, part_lse,
        meta.query_rows, meta.seq_lens, meta.block_tables,
        scale * LOG2E, num_heads, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
        GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=tile.block_n, DIRECT=num_splits == 1,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip
    if num_splits > 1:
        splits_p = triton.next_power_of_2(num_splits)
        _decode_merge_kernel[(n, num_heads)](
            out, part_out, part_lse, meta.query_rows, meta.seq_lens,
            num_heads, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_N=tile.block_n,
            SPLITS_P=splits_p, num_warps=4 if splits_p * head_dim <= 8192 else 8,
        )  # fmt: skip
