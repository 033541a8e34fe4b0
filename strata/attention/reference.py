"""Reference paged attention in plain torch, for CPU and GPU; the test oracle for kernels.

Single-token queries (decodes) of all sequences run as one padded batch; each longer
chunk (prefill) runs on its own with an explicit causal mask offset by its cached prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from strata.attention.backend import AttentionBackend, AttentionMetadata, BatchLayout


@dataclass(frozen=True)
class _Prefill:
    query_start: int
    query_len: int
    context_len: int
    block_ids: torch.Tensor  # [num_blocks covering context_len]
    mask: torch.Tensor  # [query_len, padded context] bool, True = attend


@dataclass(frozen=True)
class ReferenceMetadata(AttentionMetadata):
    slot_mapping: torch.Tensor  # [tokens]
    prefills: list[_Prefill]
    decode_rows: torch.Tensor | None  # [decodes] indices into the flat batch
    decode_block_tables: torch.Tensor | None  # [decodes, max_blocks], padded with block 0
    decode_mask: torch.Tensor | None  # [decodes, 1, 1, max_blocks * block_size]


class ReferenceAttention(AttentionBackend[ReferenceMetadata]):
    """Writes K/V with the base class's torch path (`write_kv`, `write_rope_kv`)."""

    name = "reference"

    def prepare(
        self, layout: BatchLayout, slot_mapping: Tensor, device: torch.device
    ) -> ReferenceMetadata:
        bs = layout.block_size
        prefills: list[_Prefill] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_ctx: list[int] = []
        start = 0
        for q_len, ctx, table in zip(
            layout.query_lens, layout.context_lens, layout.block_tables, strict=True
        ):
            num_blocks = -(-ctx // bs)
            if q_len == 1:
                decode_rows.append(start)
                decode_tables.append(table[:num_blocks])
                decode_ctx.append(ctx)
            else:
                key_pos = torch.arange(num_blocks * bs, device=device)
                query_pos = torch.arange(ctx - q_len, ctx, device=device)
                mask = key_pos[None, :] <= query_pos[:, None]
                block_ids = torch.tensor(table[:num_blocks], dtype=torch.long, device=device)
                prefills.append(_Prefill(start, q_len, ctx, block_ids, mask))
            start += q_len

        rows = tables = dmask = None
        if decode_rows:
            max_blocks = max(len(t) for t in decode_tables)
            padded = [t + [0] * (max_blocks - len(t)) for t in decode_tables]
            rows = torch.tensor(decode_rows, dtype=torch.long, device=device)
            tables = torch.tensor(padded, dtype=torch.long, device=device)
            ctx_t = torch.tensor(decode_ctx, dtype=torch.long, device=device)
            key_pos = torch.arange(max_blocks * bs, device=device)
            dmask = (key_pos[None, :] < ctx_t[:, None])[:, None, None, :]
        return ReferenceMetadata(slot_mapping, prefills, rows, tables, dmask)

    def attend(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: ReferenceMetadata, scale: float
    ) -> Tensor:
        out = torch.empty_like(q)
        heads, dim = k_cache.shape[-2:]
        for p in meta.prefills:
            k = k_cache[p.block_ids].reshape(-1, heads, dim).transpose(0, 1)
            v = v_cache[p.block_ids].reshape(-1, heads, dim).transpose(0, 1)
            qs = q[p.query_start : p.query_start + p.query_len].transpose(0, 1)
            o = F.scaled_dot_product_attention(
                qs, k.to(q.dtype), v.to(q.dtype), attn_mask=p.mask, scale=scale, enable_gqa=True
            )
            out[p.query_start : p.query_start + p.query_len] = o.transpose(0, 1)
        if meta.decode_rows is not None:
            assert meta.decode_block_tables is not None
            n = meta.decode_block_tables.shape[0]
            k = k_cache[meta.decode_block_tables].reshape(n, -1, heads, dim).transpose(1, 2)
            v = v_cache[meta.decode_block_tables].reshape(n, -1, heads, dim).transpose(1, 2)
            qd = q[meta.decode_rows].unsqueeze(2)  # [n, heads, 1, dim]
            o = F.scaled_dot_product_attention(
                qd,
                k.to(q.dtype),
                v.to(q.dtype),
                attn_mask=meta.decode_mask,
                scale=scale,
                enable_gqa=True,
            )
            out[meta.decode_rows] = o.squeeze(2)
        return out
