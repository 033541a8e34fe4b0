"""Paged varlen causal prefill attention in Triton (chunks with or without a cached prefix).

One program per (query tile, KV head). A tile is BLOCK_Q consecutive tokens of one
sequence times the G query heads of the KV head, laid out as BLOCK_M = BLOCK_Q * G_P rows
(row r = token r // G_P, head r % G_P; G_P = G rounded up to a power of two), so each
K/V tile is loaded once for the whole head group.

Tiles are numbered without a host-built list: sequence i owns tiles

    [cu[i] // BLOCK_Q + i, cu[i + 1] // BLOCK_Q + i + 1)    (cu = cu_query_lens)

which is at least ceil(query_len_i / BLOCK_Q) tiles; a program finds its sequence by
binary search over cu and exits if its tile starts past the chunk. The grid,
(num_tokens // BLOCK_Q + num_seqs, kv_heads), is walked last tile first so the longest
causal rows start early.

A tile whose queries sit at positions [a, b) reads keys [0, b): keys below a rounded
down to BLOCK_N need no causal mask; the rest (at most ceil(BLOCK_Q / BLOCK_N) + 1
tiles) are masked. Key 0 is in the first tile, so every row's running max is finite
after it and masked keys contribute exp2(-inf) = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from strata.attention.triton_meta import PrefillMetadata

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    q, m, l_sum, acc, k_ptr, v_ptr, table, n0, key_end, q_pos, kv_head, qk_scale,
    stride_kb, stride_kt, stride_kh,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pos = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if CAUSAL:
        k_mask = pos < key_end
        block = tl.load(table + pos // BLOCK_SIZE, mask=k_mask, other=0).to(tl.int64)
    else:
        block = tl.load(table + pos // BLOCK_SIZE).to(tl.int64)
    offs = block * stride_kb + (pos % BLOCK_SIZE) * stride_kt + kv_head * stride_kh
    kv_ptrs = offs[:, None] + offs_d[None, :]
    if CAUSAL:
        k = tl.load(k_ptr + kv_ptrs, mask=k_mask[:, None], other=0.0)
        v = tl.load(v_ptr + kv_ptrs, mask=k_mask[:, None], other=0.0)
    else:
        k = tl.load(k_ptr + kv_ptrs)
        v = tl.load(v_ptr + kv_ptrs)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if CAUSAL:
        visible = (pos[None, :] <= q_pos[:, None]) & k_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m - m_new)
    l_sum = l_sum * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_sum, acc


# Per-step values (batch counts, table width, metadata views at any offset) are not
# specialised on: one compiled variant serves every step.
@triton.jit(
    do_not_specialize=[
        "query_rows_ptr",
        "cu_ptr",
        "seq_lens_ptr",
        "block_tables_ptr",
        "num_seqs",
        "num_tiles",
        "search_steps",
        "stride_bt",
    ]
)
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    query_rows_ptr, cu_ptr, seq_lens_ptr, block_tables_ptr,
    num_seqs, num_tiles, search_steps, qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_bt,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    tile = num_tiles - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    # invariant: first tile of sequence lo <= tile < first tile of hi (tensors, not ints:
    # triton makes an argument equal to 1 a constant, which the loop could not re-bind)
    lo = tl.full([], 0, dtype=tl.int32)
    hi = lo + num_seqs
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        ok = tl.load(cu_ptr + mid) // BLOCK_Q + mid <= tile
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    seq = lo
    q_start = tl.load(cu_ptr + seq)
    q_len = tl.load(cu_ptr + seq + 1) - q_start
    first = (tile - q_start // BLOCK_Q - seq) * BLOCK_Q  # first token of the tile in the chunk
    if first >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len

    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    token = first + offs_m // GROUP_P
    head = kv_head * GROUP + offs_m % GROUP_P
    row_mask = (token < q_len) & (offs_m % GROUP_P < GROUP)
    q_row = tl.load(query_rows_ptr + seq).to(tl.int64) + token
    q_ptrs = q_ptr + q_row[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_mask[:, None], other=0.0)
    q_pos = prefix + token

    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_sum = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, dtype=tl.float32)
    full_end = (prefix + first + 1) // BLOCK_N * BLOCK_N  # keys every row of the tile sees
    key_end = tl.minimum(prefix + first + BLOCK_Q, seq_len)
    for n0 in range(0, full_end, BLOCK_N):
        m, l_sum, acc = _attend_tile(
            q, m, l_sum, acc, k_ptr, v_ptr, table, n0, key_end, q_pos, kv_head, qk_scale,
            stride_kb, stride_kt, stride_kh,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, PRECISION,
        )  # fmt: skip
    for n0 in range(full_end, key_end, BLOCK_N):
        m, l_sum, acc = _attend_tile(
            q, m, l_sum, acc, k_ptr, v_ptr, table, n0, key_end, q_pos, kv_head, qk_scale,
            stride_kb, stride_kt, stride_kh,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, PRECISION,
        )  # fmt: skip

    acc = acc / l_sum[:, None]
    out_ptrs = out_ptr + q_row[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


@dataclass(frozen=True)
class PrefillTile:
    block_m: int  # query rows (tokens x padded head group) per program
    block_n: int  # keys per inner step
    num_warps: int
    num_stages: int


def default_tile(head_dim: int, dtype: torch.dtype) -> PrefillTile:
    """Hopper choice. At head_dim 128 an H200 sweep (8k/32k tokens, GQA 4) ranked
    256x64 with 8 warps first (408/454 TFLOP/s), 128x64 with 4 warps next (397/426),
    128x128 last (~200); 2 stages lost a quarter. Other head dims are not swept."""
    if dtype == torch.float32:
        return PrefillTile(64, 32, 4, 2)
    if head_dim <= 64:
        return PrefillTile(128, 64, 4, 3)
    if head_dim <= 128:
        return PrefillTile(256, 64, 8, 3)
    return PrefillTile(64, 32, 4, 2)


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    meta: PrefillMetadata,
    block_size: int,
    scale: float,
    tile: PrefillTile | None = None,
) -> None:
    """Write out[chunk rows] = causal attention of each chunk over its prefix and itself."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[2]
    group = num_heads // kv_heads
    group_p = triton.next_power_of_2(group)
    tile = tile or default_tile(head_dim, q.dtype)
    block_q = max(1, tile.block_m // group_p)
    num_seqs = meta.seq_lens.shape[0]
    num_tiles = meta.num_tokens // block_q + num_seqs
    _prefill_kernel[(num_tiles, kv_heads)](
        q, k_cache, v_cache, out,
        meta.query_rows, meta.cu_query_lens, meta.seq_lens, meta.block_tables,
        num_seqs, num_tiles, num_seqs.bit_length(), scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
        GROUP=group, GROUP_P=group_p, BLOCK_Q=block_q, HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=tile.block_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip
