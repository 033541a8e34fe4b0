"""Chunked selection: keep whole runs of CHUNK slots instead of single tokens (ChunkKV).

Token-level selection keeps fragments: a 7-digit number may keep 4 of its digits in one
layer and a different 4 in the next. Ranking contiguous chunks by their total score and
keeping the same chunks in every KV head of a layer keeps such spans whole.
"""

from __future__ import annotations

import torch


def chunk_ranking(votes: torch.Tensor, chunk: int, always: int) -> torch.Tensor:
    """[n] float32, highest first: the last `always` slots, then whole chunks of `chunk`
    slots (aligned to slot 0) in order of their summed votes, each chunk's slots in order
    of their votes, so the chunk that does not fit keeps its best-voted slots.
    votes: [n], one score per slot."""
    n = votes.shape[-1]
    before = n - always
    chunks = -(-before // chunk)
    padded = torch.zeros(chunks * chunk, device=votes.device, dtype=votes.dtype)
    padded[:before] = votes[:before]
    by_chunk = padded.view(chunks, chunk)
    # rank: chunks by total vote (best first), slots within a chunk by their vote
    chunk_rank = torch.empty(chunks, dtype=torch.long, device=votes.device)
    order = torch.sort(by_chunk.sum(dim=-1), descending=True, stable=True).indices
    chunk_rank[order] = torch.arange(chunks, device=votes.device)
    slot_order = torch.sort(by_chunk, dim=-1, descending=True, stable=True).indices
    slot_rank = torch.empty_like(slot_order).scatter_(
        -1, slot_order, torch.arange(chunk, device=votes.device).expand(chunks, -1)
    )
    rank = (chunk_rank[:, None] * chunk + slot_rank).view(-1)[:before]
    # The last `always` slots outrank every chunk, the newest first should k be below them.
    return torch.cat([
        -rank.float(),
        1e9 + torch.arange(always, device=votes.device, dtype=torch.float32),
    ])  # fmt: skip
