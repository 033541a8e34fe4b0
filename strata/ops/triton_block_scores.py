"""Triton kernel: a recall policy's block scores from its summaries' logits, in one pass
pair per (row, KV head).

    logits [..., KVH, G, N]  one per query head of the GQA group and summary (a quest
                             block, or a shadowkv chunk: per_block of them a block)
    live   [...] or None     blocks that exist in each row; the rest are dead
    out    [..., KVH, N / per_block]  float32

    p[g, n]   = softmax over the live summaries n of logits[g, n] * scale (float32)
    out[b]    = max over g and the block's summaries n of p[g, n];  -inf for a dead block

as `scores` in quest.py and shadowkv.py compute it with about ten torch kernels and
several float32 copies of the logits. The first pass finds each query head's maximum and
sum with an online softmax, the second writes the blocks' scores. A row with no live
block gets -inf everywhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# a dead summary's logit: exp of it less any real logit is 0, never NaN (a constexpr:
# kernels read only those globals)
HIDDEN = tl.constexpr(-1.0e30)


@triton.jit
def _block_scores_kernel(
    logits_ptr, live_ptr, out_ptr, scale, KVH, N, NUM_BLOCKS,
    G: tl.constexpr, GP: tl.constexpr, PER_BLOCK: tl.constexpr, BLOCKS_PER_TILE: tl.constexpr,
    TILE: tl.constexpr, HAS_LIVE: tl.constexpr,
):  # fmt: skip
    lane = tl.program_id(0)  # row * KVH + head
    live = NUM_BLOCKS
    if HAS_LIVE:
        live = tl.minimum(tl.load(live_ptr + lane // KVH), NUM_BLOCKS)
    live_n = live * PER_BLOCK
    offs_g = tl.arange(0, GP)
    base = logits_ptr + lane.to(tl.int64) * G * N + offs_g[:, None] * N
    m = tl.full([GP], HIDDEN, dtype=tl.float32)
    total = tl.full([GP], 0.0, dtype=tl.float32)
    for n0 in range(0, live_n, TILE):
        offs = n0 + tl.arange(0, TILE)
        ok = (offs_g[:, None] < G) & (offs[None, :] < live_n)
        x = tl.load(base + offs[None, :], mask=ok, other=0.0).to(tl.float32) * scale
        x = tl.where(ok, x, HIDDEN)
        m_new = tl.maximum(m, tl.max(x, 1))
        p = tl.where(ok, tl.exp(x - m_new[:, None]), 0.0)
        total = total * tl.exp(m - m_new) + tl.sum(p, 1)
        m = m_new
    inv = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)
    out = out_ptr + lane.to(tl.int64) * NUM_BLOCKS
    for b0 in range(0, NUM_BLOCKS, BLOCKS_PER_TILE):
        offs = b0 * PER_BLOCK + tl.arange(0, TILE)
        ok = (offs_g[:, None] < G) & (offs[None, :] < live_n)
        x = tl.load(base + offs[None, :], mask=ok, other=0.0).to(tl.float32) * scale
        x = tl.where(ok, x, HIDDEN)
        p = tl.where(ok, tl.exp(x - m[:, None]) * inv[:, None], 0.0)
        best = tl.max(tl.reshape(tl.max(p, 0), (BLOCKS_PER_TILE, PER_BLOCK)), 1)
        blocks = b0 + tl.arange(0, BLOCKS_PER_TILE)
        tl.store(out + blocks, tl.where(blocks < live, best, float("-inf")),
                 mask=blocks < NUM_BLOCKS)  # fmt: skip


def block_scores(
    logits: torch.Tensor, live: torch.Tensor | None, scale: float, per_block: int = 1
) -> torch.Tensor:
    """[..., KVH, N / per_block] float32 block scores from logits [..., KVH, G, N] (any
    float dtype, contiguous); `live` [...] counts each row's live blocks (None: all)."""
    *lead, kvh, group, n = logits.shape
    if not logits.is_contiguous() or n % per_block or per_block & (per_block - 1):
        raise ValueError("block_scores needs contiguous logits and whole power-of-two blocks")
    if live is not None and tuple(live.shape) != tuple(lead):
        raise ValueError(f"live {tuple(live.shape)} is not one count a row of {tuple(lead)}")
    num_blocks = n // per_block
    out = torch.empty((*lead, kvh, num_blocks), dtype=torch.float32, device=logits.device)
    if out.numel() == 0:
        return out
    lanes = out.numel() // max(1, num_blocks)
    blocks_per_tile = max(1, min(1024 // per_block, triton.next_power_of_2(num_blocks)))
    _block_scores_kernel[(lanes,)](
        logits, live if live is not None else out, out, scale, kvh, n, num_blocks,
        G=group, GP=triton.next_power_of_2(group), PER_BLOCK=per_block,
        BLOCKS_PER_TILE=blocks_per_tile, TILE=blocks_per_tile * per_block,
        HAS_LIVE=live is not None,
    )  # fmt: skip
    return out
