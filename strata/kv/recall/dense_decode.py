"""Decode attention of one recall sequence's dense layer on CUDA, by the engine's split-K
Triton kernel (attention/triton_decode.py).

A dense layer keeps every token of the sequence, [kv_heads, capacity, head_dim] (keys
and values apart), so a decode token reads the whole context: 256 MiB a layer at 128k
tokens on the Llama-3-8B shape. A batched matmul over that runs as a GEMV with one
huge reduction and reaches a few percent of the memory bandwidth; the split-K kernel
spreads the keys over every multiprocessor. It reads the buffer in place, as pages of
DENSE_TILE tokens: page p of head h starts at token p * DENSE_TILE of row h, which is a
view (capacity is a multiple of DENSE_TILE: RecallGeometry.dense_tokens).

Nothing here syncs, and nothing depends on a host value that changes from step to step:
the attended length comes from the token's position on the device, so a whole step's
CUDA graph (step_graphs.py) replays it.
"""

from __future__ import annotations

import torch

from strata.attention.triton_meta import DecodeMetadata

DENSE_TILE = 64  # tokens per page of the view; a dense buffer's capacity is a multiple


class DenseDecode:
    """The kernel's metadata for one sequence's dense buffers: one row, pages 0, 1, ...
    in order; the attended length is set per call."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        if capacity % DENSE_TILE:
            raise ValueError(f"dense capacity {capacity} is not a multiple of {DENSE_TILE}")
        pages = torch.arange(capacity // DENSE_TILE, dtype=torch.int32, device=device)
        self.meta = DecodeMetadata(
            query_rows=torch.zeros(1, dtype=torch.int32, device=device),
            seq_lens=torch.zeros(1, dtype=torch.int32, device=device),
            block_tables=pages[None, :],
            max_seq_len=capacity,
        )

    def attend(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:  # fmt: skip
        """One query q [1, H, D] over the first `length` ([1] on the device) tokens of
        keys, values [kv_heads, capacity, D]; [1, H, D] in q's dtype."""
        from strata.attention.triton_decode import decode_attention

        self.meta.seq_lens.copy_(length)
        query = q.to(keys.dtype)
        out = torch.empty_like(query)
        decode_attention(
            query, paged_view(keys), paged_view(values), out,
            self.meta, DENSE_TILE, scale,
        )  # fmt: skip
        return out.to(q.dtype)


def paged_view(buffer: torch.Tensor) -> torch.Tensor:
    """[kv_heads, capacity, D] as the kernel's cache layout [pages, DENSE_TILE, kv_heads, D]
    (a view: strides, no copy)."""
    kvh, capacity, d = buffer.shape
    return buffer.view(kvh, capacity // DENSE_TILE, DENSE_TILE, d).permute(1, 2, 0, 3)
