"""Rank parts (kv/policies/runtime/rank_parts.py) assemble on rank 0 into the observation a
single rank makes over every head, for each RankShare, with KV heads split over the ranks
and replicated on them; no process is started."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from strata.kv.policies.observation import LayerObservation
from strata.kv.policies.rank_share import RankShare
from strata.kv.policies.runtime.rank_parts import RankDims, assemble, local_part, part_size

HEADS, DIM, M, N, RANKS = 4, 8, 3, 7, 2


def observation(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> LayerObservation:
    """m queries at the last slots of n, as an observer builds it."""
    slots = torch.arange(N - M, N)
    return LayerObservation(0, q, slots, lambda layer, n: (k[:n], v[:n]), N, DIM**-0.5)


def rank_view(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int
) -> tuple[LayerObservation, slice]:
    """Rank `rank`'s observation over its own heads, and its KV heads."""
    kv_heads = k.shape[1]
    local_kv = max(kv_heads // RANKS, 1)
    first_kv = rank * kv_heads // RANKS if kv_heads < RANKS else rank * local_kv
    heads = slice(rank * HEADS // RANKS, (rank + 1) * HEADS // RANKS)
    kv = slice(first_kv, first_kv + local_kv)
    return observation(q[:, heads], k[:, kv], v[:, kv]), kv


@pytest.mark.parametrize("kv_heads", [2, 1])  # split over the ranks, replicated on both
@pytest.mark.parametrize("share", list(RankShare))
def test_parts_assemble_into_the_single_rank_observation(kv_heads: int, share: RankShare) -> None:
    gen = torch.Generator().manual_seed(kv_heads)
    q, k, v = (torch.randn(rows, h, DIM, generator=gen)
               for rows, h in ((M, HEADS), (N, kv_heads), (N, kv_heads)))  # fmt: skip
    views = [rank_view(q, k, v, r) for r in range(RANKS)]
    dims = RankDims(max(kv_heads // RANKS, 1), HEADS // RANKS, DIM, [kv for _, kv in views])
    parts = torch.stack([local_part(share, view) for view, _ in views])
    assert parts.shape[1] == part_size(share, M, N, dims)
    whole = assemble(share, parts, M, N, dims, torch.float32)
    full = observation(q, k, v)
    if share == RankShare.SUMMED:
        assert whole.summed is not None and whole.queries is None
        torch.testing.assert_close(whole.summed, full.summed_attention(), rtol=0, atol=1e-6)
    elif share == RankShare.MAXED:
        assert whole.maxed is not None and whole.keys is None
        torch.testing.assert_close(whole.maxed, full.max_attention(), rtol=0, atol=1e-6)
    else:
        assert whole.queries is not None and torch.equal(whole.queries, q)
    if share == RankShare.QUERIES_KV:
        assert whole.keys is not None and whole.values is not None
        assert torch.equal(whole.keys, k) and torch.equal(whole.values, v)
    elif share == RankShare.QUERIES:
        assert whole.keys is None


def test_max_attention_is_the_largest_of_any_query_and_head() -> None:
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(*shape, generator=gen) for shape in ((M, 4, 8), (N, 2, 8), (N, 2, 8)))
    obs = observation(q, k, v)
    probs = obs.attention()  # [kv_heads, group, m, n]
    assert torch.equal(obs.max_attention(), probs.amax(dim=(1, 2)))
    given = replace(obs, maxed=torch.ones(2, N))  # as the gathered observer hands it over
    assert torch.equal(given.max_attention(), torch.ones(2, N))
