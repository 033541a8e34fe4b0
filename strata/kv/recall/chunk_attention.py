"""Attention of one sequence's chunk over keys it has gathered for one layer.

    keys   | prefix (earlier tokens, any order) ... | seg: tokens [seg_start, end) in order |
    query i (token start + i) sees every prefix key the per-head mask allows, and the seg
    keys of tokens <= start + i.

Keys are post-RoPE, so their order outside `seg` does not matter. Without a prefix mask
the pattern is causal from the bottom right, which SDPA runs without building a mask.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

# cuDNN's kernel plans anew for every key count, which a growing prefix changes each step.
FUSED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def chunk_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    prefix_mask: torch.Tensor | None,
    seg_start: int,
    start: int,
    scale: float,
) -> torch.Tensor:
    """q [T, H, D] of tokens [start, start + T); keys/values [KVH, n, D] = prefix then seg;
    prefix_mask [KVH, prefix] bool or None (all visible). Returns [T, H, D]."""
    t, h, _ = q.shape
    kvh, n, _ = keys.shape
    prefix = n - (start + t - seg_start)
    if t == 1:  # a decode sees every key the mask allows
        return decode_attention(q, keys, values, prefix_mask, scale)
    if prefix_mask is None:  # query i sees keys [0, n - t + i]: causal from the bottom right
        return _sdpa(q, keys, values, causal_lower_right(t, n), scale)
    seg_pos = torch.arange(seg_start, start + t, device=q.device)
    q_pos = torch.arange(start, start + t, device=q.device)
    seg_mask = seg_pos[None, :] <= q_pos[:, None]  # [T, seg]
    if prefix_mask is None:
        head_prefix = torch.ones((kvh, t, prefix), dtype=torch.bool, device=q.device)
    else:
        head_prefix = prefix_mask[:, None, :].expand(kvh, t, prefix)
    mask = torch.cat([head_prefix, seg_mask[None].expand(kvh, t, -1)], dim=-1)
    return _sdpa(q, keys, values, mask.repeat_interleave(h // kvh, dim=0)[None], scale)


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, prefix_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:  # fmt: skip
    """One query per head q [1, H, D] over keys [KVH, n, D], the first prefix_mask.shape[1]
    of them where prefix_mask [KVH, prefix] allows: a few kernels, whatever the key count
    (SDPA's fused kernels would plan anew for every length)."""
    kvh, n, _ = keys.shape
    visible = torch.ones((kvh, n), dtype=torch.bool, device=q.device)
    if prefix_mask is not None:
        visible[:, : prefix_mask.shape[1]] = prefix_mask
    return masked_decode_attention(q, keys[None], values[None], visible[None], scale)


def masked_decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
    scale: float,
) -> torch.Tensor:  # fmt: skip
    """One query per head and row, q [rows, H, D], over keys [rows, KVH, n, D] where
    visible [rows, KVH, n]. Scores in the KV dtype, softmax in float32; [rows, H, D]."""
    rows, kvh, _, d = keys.shape
    grouped = q.view(rows, kvh, -1, d).to(keys.dtype)  # [rows, KVH, group, D]
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~visible[:, :, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values)
    return out.reshape(rows, -1, d).to(q.dtype)


def _sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: Any, scale: float
          ) -> torch.Tensor:  # fmt: skip
    with sdpa_kernel(FUSED_BACKENDS):
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            keys[None].to(q.dtype),
            values[None].to(q.dtype),
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )
    return out[0].transpose(0, 1)
