"""HeadShard (strata/kv/recall/ranks.py): tensor-parallel ranks' recall stores, each over
its own KV heads, compute what one rank holding every head does. Ranks are threads of
this process here (their all-reduce sums every rank's tensor, in rank order); the
engine under real ranks is tests/test_tensor_parallel_policies.py."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import pytest
import torch

from strata.kv.recall import shadowkv as shadowkv_module
from strata.kv.recall.policy import SummaryRoom
from strata.kv.recall.quest import QuestPolicy
from strata.kv.recall.ranks import HeadShard
from strata.kv.recall.shadowkv import ShadowKVPolicy
from tests.test_recall_shadowkv import BLOCK, rotary

T = TypeVar("T")


class ThreadRank:
    """One of `size` ranks run as threads; all_reduce meets the others."""

    def __init__(self, rank: int, size: int, barrier: threading.Barrier, parts: dict) -> None:
        self.rank, self.size, self.barrier, self.parts = rank, size, barrier, parts

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self.parts[self.rank] = tensor.clone()
        self.barrier.wait()
        total = sum(self.parts[r] for r in range(self.size))
        self.barrier.wait()
        return tensor.copy_(total)


def on_ranks(size: int, work: Callable[[ThreadRank], T]) -> list[T]:
    """work(rank) on `size` threaded ranks; their results in rank order."""
    barrier, parts = threading.Barrier(size, timeout=30), {}
    out: dict[int, T] = {}
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            out[rank] = work(ThreadRank(rank, size, barrier, parts))
        except BaseException as exc:  # re-raised below, once every thread is done
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [out[r] for r in range(size)]


def test_a_replicated_heads_selection_takes_its_whole_gqa_group() -> None:
    """One KV head on two ranks, each with half of its four query heads: quest's scores,
    the max over each rank's half and then over the ranks, are the whole group's."""
    torch.manual_seed(0)
    dim, blocks = 8, 6
    keys, q = torch.randn(1, blocks, BLOCK, dim), torch.randn(1, 4, dim)

    def scores(q: torch.Tensor) -> torch.Tensor:
        quest = QuestPolicy()
        quest.allocate(SummaryRoom(1, 1, blocks, dim, BLOCK, torch.float32))
        quest.summarize(0, 0, keys)
        return quest.scores(0, q, blocks)

    def rank_scores(comm: ThreadRank) -> torch.Tensor:
        half = q[:, 2 * comm.rank : 2 * comm.rank + 2]
        return HeadShard(comm, model_kv_heads=1).max_over_replicas(scores(half))

    whole = scores(q)
    assert not torch.equal(scores(q[:, :2]), whole)  # a half alone would pick otherwise
    for got in on_ranks(2, rank_scores):
        assert torch.equal(got, whole)


@pytest.mark.parametrize("model_kv_heads", [2, 1])  # split over the ranks, replicated
def test_shadowkv_ranks_fit_the_single_ranks_basis(
    model_kv_heads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At a rank below heads x dim (a basis that loses something, so one fitted to some
    heads differs), every rank gathers every head's keys: it holds the single rank's
    basis and factors, also for blocks projected after the fit, and rebuilds its own
    heads' keys as the single rank does."""
    monkeypatch.setattr(shadowkv_module, "RANK", 6)
    torch.manual_seed(0)
    dim, blocks, slots = 8, 8, 4
    keys = torch.randn(model_kv_heads, blocks, BLOCK, dim)
    q = torch.randn(model_kv_heads, 2, dim)
    picks = torch.tensor([[1, 5, 6]] * model_kv_heads)

    def run(heads: slice, shard: HeadShard | None) -> tuple[torch.Tensor, ...]:
        n = heads.stop - heads.start
        policy = ShadowKVPolicy()
        room = SummaryRoom(1, n, blocks, dim, BLOCK, torch.float32, slots, shard=shard)
        policy.allocate(room, rotary(dim))
        policy.summarize(0, 0, keys[heads, :5])
        policy.take_all_keys(0, keys[heads, :5])
        policy.summarize(0, 5, keys[heads, 5:])  # projected on the fitted basis
        policy.scores(0, q[heads], blocks)
        rebuilt = policy.rebuilt_keys(0, picks[heads])
        assert rebuilt is not None
        return policy.basis[0], policy.factors[0], rebuilt

    basis, factors, rebuilt = run(slice(0, model_kv_heads), None)

    def rank_run(comm: ThreadRank) -> tuple[torch.Tensor, ...]:
        shard = HeadShard(comm, model_kv_heads)
        return run(shard.own_heads(1), shard)

    for rank, (b, f, k) in enumerate(on_ranks(2, rank_run)):
        torch.testing.assert_close(b, basis, rtol=0, atol=1e-6)
        torch.testing.assert_close(f, factors, rtol=0, atol=1e-5)
        head = rank * model_kv_heads // 2
        torch.testing.assert_close(k, rebuilt[head : head + 1], rtol=0, atol=1e-5)
    own = run(slice(0, 1), None)[2]  # a rank fitting to its own head alone
    if model_kv_heads == 2:
        assert not torch.allclose(own, rebuilt[:1], atol=1e-3)
