"""One observed sequence's layer on every rank: each rank's part, and rank 0's whole.

A rank's part is a flat float32 vector whose length every rank knows (`part_size`), so
the parts of all observed sequences go to rank 0 in one gather a layer
(runtime/gathered.py). Rank 0 turns the ranks' parts back into what a single rank would
have observed over every head (`assemble`), by the policy's RankShare:

    SUMMED, MAXED   [its KV heads, n]            whole[heads of r] += / max= part of r
    QUERIES         [m, its query heads, d]      heads of ranks 0, 1, ... in order
    QUERIES_KV      + keys, values [n, its KV heads, d] each
                                                 whole[:, heads of r] = part of r

Query heads are split over the ranks in order, never replicated; a KV head may be
replicated (fewer KV heads than ranks), and its copies are alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from strata.kv.policies.observation import LayerObservation
from strata.kv.policies.rank_share import RankShare


@dataclass(frozen=True)
class RankDims:
    """A rank's heads (alike on every rank) and, on rank 0, where each rank's KV heads sit."""

    local_kv_heads: int
    local_heads: int
    head_dim: int
    kv_head_slices: list[slice]  # rank 0 only: rank r's KV heads among the model's

    @property
    def num_kv_heads(self) -> int:
        return max((s.stop for s in self.kv_head_slices), default=0)


@dataclass(frozen=True)
class Whole:
    """Rank 0's assembled observation pieces; None for what the share does not carry."""

    queries: torch.Tensor | None = None  # [m, heads, d]
    keys: torch.Tensor | None = None  # [n, kv_heads, d]
    values: torch.Tensor | None = None
    summed: torch.Tensor | None = None  # [kv_heads, n]
    maxed: torch.Tensor | None = None


def part_size(share: RankShare, m: int, n: int, dims: RankDims) -> int:
    """Float32s in one rank's part of m queries over n slots."""
    if share in (RankShare.SUMMED, RankShare.MAXED):
        return dims.local_kv_heads * n
    queries = m * dims.local_heads * dims.head_dim
    if share == RankShare.QUERIES:
        return queries
    return queries + 2 * n * dims.local_kv_heads * dims.head_dim


def local_part(share: RankShare, obs: LayerObservation) -> torch.Tensor:
    """This rank's part (flat float32) of an observation over its own heads."""
    if share == RankShare.SUMMED:
        return obs.summed_attention().reshape(-1)
    if share == RankShare.MAXED:
        return obs.max_attention().reshape(-1)
    queries = obs.queries.float().reshape(-1)
    if share == RankShare.QUERIES:
        return queries
    return torch.cat([queries, obs.keys.float().reshape(-1), obs.values.float().reshape(-1)])


def assemble(
    share: RankShare, parts: torch.Tensor, m: int, n: int, dims: RankDims, dtype: torch.dtype
) -> Whole:
    """Rank 0: the whole observation from parts [ranks, part_size]; queries, keys and
    values in `dtype` (the model's), as a single rank reads them."""
    if share in (RankShare.SUMMED, RankShare.MAXED):
        whole = torch.zeros(dims.num_kv_heads, n, device=parts.device)
        for rank, heads in enumerate(dims.kv_head_slices):
            part = parts[rank].view(dims.local_kv_heads, n)
            if share == RankShare.SUMMED:
                whole[heads] += part
            else:
                whole[heads] = torch.maximum(whole[heads], part)
        return Whole(summed=whole) if share == RankShare.SUMMED else Whole(maxed=whole)
    size = m * dims.local_heads * dims.head_dim
    queries = parts[:, :size].reshape(len(parts), m, dims.local_heads, dims.head_dim)
    queries = queries.transpose(0, 1).reshape(m, -1, dims.head_dim).to(dtype)
    if share == RankShare.QUERIES:
        return Whole(queries=queries)
    keys, values = (
        torch.empty(n, dims.num_kv_heads, dims.head_dim, dtype=dtype, device=parts.device)
        for _ in range(2)
    )
    per = n * dims.local_kv_heads * dims.head_dim
    for rank, heads in enumerate(dims.kv_head_slices):
        for i, whole in enumerate((keys, values)):
            part = parts[rank, size + i * per : size + (i + 1) * per]
            whole[:, heads] = part.view(n, dims.local_kv_heads, dims.head_dim).to(dtype)
    return Whole(queries, keys, values)
