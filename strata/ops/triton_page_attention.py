"""Triton kernel: a recall page's decode attention, read in place from its three parts.

For page row r and KV head h, the keys (and values) a decode token attends are

    sink  [S tokens]           sink_k[r, h]             all visible
    slots [SLOTS x BS tokens]  ws_k[r, h, slot, t]      visible where attended[r, h, slot]
    tail  [T tokens]           tail_k[r, h, i]          visible where i <= held[r]

in that order (as page_decode's torch path concatenates them). One program per (row, KV
head, split) walks its share of that axis in tiles of BLOCK_N keys, the G query heads of
the KV head sharing each tile ([G, D] x [D, BLOCK_N], G padded to 16), with an online
softmax in float32 (scores from float32 products, not rounded to the keys' dtype first).
Each split writes its normalised output and log2-sum-exp; a second kernel merges the
splits. A split whose keys are all hidden adds nothing: every row sees its sink and the
newest token, so the merged maximum is a real score.

This replaces the torch path's two concatenations of the keys and values (about 8 MB a
row and layer on the Llama-3-8B shape), the mask's and the softmax's kernels.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# a hidden key's score: exp2 of it less any real score is 0, never NaN (a constexpr:
# kernels read only those globals)
HIDDEN = tl.constexpr(-1.0e30)
PROGRAMS_PER_SM = 4


@triton.jit
def _page_attention_kernel(
    q_ptr, sink_k, sink_v, ws_k, ws_v, tail_k, tail_v, attended_ptr, held_ptr,
    part_out_ptr, part_lse_ptr,
    qk_scale, num_splits, chunk,
    q_row, sink_row, sink_head, ws_row, ws_head, tail_row, tail_head,
    KVH, SINK, SLOTS, TAIL,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    width = SLOTS * BS
    total = SINK + width + TAIL
    start = split * chunk
    end = tl.minimum(start + chunk, total)
    held = tl.load(held_ptr + row)
    offs_g = tl.arange(0, GROUP_P)
    offs_d = tl.arange(0, D)
    g_mask = offs_g < GROUP
    heads = h * GROUP + offs_g
    r64 = row.to(tl.int64)
    q = tl.load(q_ptr + r64 * q_row + heads[:, None] * D + offs_d[None, :], mask=g_mask[:, None],
                other=0.0).to(sink_k.dtype.element_ty)  # fmt: skip
    sink_base = r64 * sink_row + h * sink_head
    ws_base = r64 * ws_row + h * ws_head
    tail_base = r64 * tail_row + h * tail_head
    m = tl.full([GROUP_P], HIDDEN, dtype=tl.float32)
    l_sum = tl.full([GROUP_P], 0.0, dtype=tl.float32)
    acc = tl.full([GROUP_P, D], 0.0, dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        in_sink = pos < SINK
        in_ws = (pos >= SINK) & (pos < SINK + width)
        in_tail = (pos >= SINK + width) & (pos < end)
        at = tl.where(in_ws, pos - SINK, 0)
        slot_on = tl.load(attended_ptr + (r64 * KVH + h) * SLOTS + at // BS, mask=in_ws, other=0)
        tail_at = tl.where(in_tail, pos - SINK - width, 0)
        visible = in_sink | (in_ws & (slot_on != 0)) | (in_tail & (tail_at <= held))
        sink_off = sink_base + tl.where(in_sink, pos, 0).to(tl.int64) * D
        ws_off = ws_base + at.to(tl.int64) * D
        tail_off = tail_base + tail_at.to(tl.int64) * D
        grid = offs_d[None, :]
        k = tl.load(sink_k + sink_off[:, None] + grid, mask=(in_sink & visible)[:, None], other=0.0)
        k += tl.load(ws_k + ws_off[:, None] + grid, mask=(in_ws & visible)[:, None], other=0.0)
        k += tl.load(tail_k + tail_off[:, None] + grid, mask=(in_tail & visible)[:, None],
                     other=0.0)  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(visible[None, :], s, HIDDEN)
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        p = tl.where(visible[None, :], p, 0.0)
        alpha = tl.math.exp2(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = tl.load(sink_v + sink_off[:, None] + grid, mask=(in_sink & visible)[:, None], other=0.0)
        v += tl.load(ws_v + ws_off[:, None] + grid, mask=(in_ws & visible)[:, None], other=0.0)
        v += tl.load(tail_v + tail_off[:, None] + grid, mask=(in_tail & visible)[:, None],
                     other=0.0)  # fmt: skip
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    nothing = l_sum == 0.0  # every key of this split hidden: weight 0 in the merge
    lse = tl.where(nothing, HIDDEN, m + tl.math.log2(tl.where(nothing, 1.0, l_sum)))
    acc = acc / tl.where(nothing, 1.0, l_sum)[:, None]
    base = (r64 * KVH * GROUP + heads) * num_splits + split
    tl.store(part_lse_ptr + base, lse, mask=g_mask)
    tl.store(part_out_ptr + base[:, None] * D + offs_d[None, :], acc, mask=g_mask[:, None])


@triton.jit
def _merge_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, num_heads, num_splits, out_row,
    D: tl.constexpr, SPLITS_P: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_P)
    offs_d = tl.arange(0, D)
    s_mask = offs_s < num_splits
    base = (row.to(tl.int64) * num_heads + head) * num_splits + offs_s
    lse = tl.load(part_lse_ptr + base, mask=s_mask, other=HIDDEN)
    weight = tl.where(s_mask, tl.math.exp2(lse - tl.max(lse, 0)), 0.0)
    parts = tl.load(part_out_ptr + base[:, None] * D + offs_d[None, :], mask=s_mask[:, None],
                    other=0.0)  # fmt: skip
    merged = tl.sum(parts * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(out_ptr + row.to(tl.int64) * out_row + head * D + offs_d,
             merged.to(out_ptr.dtype.element_ty))  # fmt: skip


# (as strata/attention/triton_decode.py's: ops may not import the attention package above
# them, so the SM count and split rule are kept here too)
@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tokens_contiguous(t: torch.Tensor) -> bool:
    """Each (row, head)'s tokens lie [n, D] contiguous (rows and heads may be strided)."""
    return t.stride(-1) == 1 and t.stride(-2) == t.shape[-1]


def page_attention(
    q: torch.Tensor, sink_k: torch.Tensor, sink_v: torch.Tensor, ws_k: torch.Tensor,
    ws_v: torch.Tensor, attended: torch.Tensor, tail_k: torch.Tensor, tail_v: torch.Tensor,
    held: torch.Tensor, scale: float, block_n: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """[rows, H, D] in q's dtype: q [rows, H, D] over sink [rows, KVH, S, D], the working
    set's slots [rows, KVH, SLOTS, BS, D] where attended [rows, KVH, SLOTS], and the tail
    [rows, KVH, T, D] up to held [rows] (inclusive). Keys and values share a dtype and
    layout; the split count depends on the shapes alone (CUDA graphs keep their grid)."""
    rows, num_heads, d = q.shape
    kvh, slots, bs = ws_k.shape[1], ws_k.shape[2], ws_k.shape[3]
    parts = (sink_k, sink_v, tail_k, tail_v)
    if num_heads % kvh or not all(_tokens_contiguous(t) for t in parts):
        raise ValueError("page_attention needs whole GQA groups and [tokens, D] rows per head")
    if ws_k.stride(-1) != 1 or ws_k.stride(-2) != d or ws_k.stride(-3) != bs * d:
        raise ValueError("page_attention needs each head's working-set slots contiguous")
    if ws_v.stride() != ws_k.stride() or sink_v.stride() != sink_k.stride() or (
        tail_v.stride() != tail_k.stride()
    ):
        raise ValueError("page_attention needs keys and values of one layout")
    if not q.is_contiguous() or not attended.is_contiguous() or held.shape != (rows,):
        raise ValueError("page_attention needs contiguous q and attended, and one held a row")
    block_n = block_n or (32 if q.dtype == torch.float32 else 64)
    total = sink_k.shape[2] + slots * bs + tail_k.shape[2]
    want = PROGRAMS_PER_SM * _num_sms(q.device) // max(1, rows * kvh)
    splits = max(1, min(want, triton.cdiv(total, block_n)))
    chunk = triton.cdiv(triton.cdiv(total, splits), block_n) * block_n
    splits = triton.cdiv(total, chunk)
    group = num_heads // kvh
    part_out = torch.empty((rows, num_heads, splits, d), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((rows, num_heads, splits), dtype=torch.float32, device=q.device)
    _page_attention_kernel[(rows, kvh, splits)](
        q, sink_k, sink_v, ws_k, ws_v, tail_k, tail_v, attended, held, part_out, part_lse,
        scale * LOG2E, splits, chunk,
        q.stride(0), sink_k.stride(0), sink_k.stride(1), ws_k.stride(0), ws_k.stride(1),
        tail_k.stride(0), tail_k.stride(1), kvh, sink_k.shape[2], slots, tail_k.shape[2],
        GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)), D=d, BS=bs,
        BLOCK_N=block_n, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    out = torch.empty_like(q)
    _merge_kernel[(rows, num_heads)](
        out, part_out, part_lse, num_heads, splits, out.stride(0),
        D=d, SPLITS_P=triton.next_power_of_2(splits),
    )  # fmt: skip
    return out
