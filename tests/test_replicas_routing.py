"""Routers and the router's block index, without Ray: exact choices and reasons."""

from __future__ import annotations

import typing

from strata.kv.index_events import EVICTED, STORED, IndexEvents, ObservedPrefixIndex
from strata.server.config import RouterName
from strata.server.replicas.block_index import BlockIndex
from strata.server.replicas.relay import has_token
from strata.server.replicas.routers import ROUTERS, Candidate, KVAware, LeastLoaded, RoundRobin


def test_router_names_are_the_registry() -> None:
    assert typing.get_args(RouterName) == ROUTERS.names()


def test_kv_aware_prefers_the_holder_and_load_breaks_ties() -> None:
    router = KVAware()
    held = [Candidate(0, 0, 0.5, 0), Candidate(1, 0, 0.9, 6)]
    assert router.choose(held, 8) == router.choose(held, 8)
    assert router.choose(held, 8).replica == 1 and router.choose(held, 8).reason == "prefix"
    none_held = [Candidate(0, 1, 0.0, 0), Candidate(1, 0, 0.9, 0)]
    assert (router.choose(none_held, 8).replica, router.choose(none_held, 8).reason) == (1, "load")
    kv_tie = [Candidate(0, 0, 0.3, 0), Candidate(1, 0, 0.1, 0)]
    assert router.choose(kv_tie, 8).replica == 1
    # Holding 2 of 8 blocks does not outweigh 2 requests in flight (cost 6+8 > 8).
    busy = [Candidate(0, 2, 0.0, 2), Candidate(1, 0, 0.0, 0)]
    assert (router.choose(busy, 8).replica, router.choose(busy, 8).reason) == (1, "load")


def test_least_loaded_and_round_robin() -> None:
    cands = [Candidate(0, 3, 0.0, 9), Candidate(1, 1, 0.0, 0), Candidate(2, 1, 0.2, 0)]
    assert LeastLoaded().choose(cands, 9).replica == 1
    rr = RoundRobin()
    assert [rr.choose(cands, 0).replica for _ in range(4)] == [0, 1, 2, 0]
    assert rr.choose(cands[::2], 0).replica == 2  # replica 1 down: skipped


def test_index_events_replay_to_the_index_keys() -> None:
    events = IndexEvents()
    index = ObservedPrefixIndex(events)
    index.insert(b"a", [1], 0)
    index.insert(b"b", [2], 1)
    assert not index.insert(b"a", [1], 2)  # already indexed: no event
    index.remove_block(0)
    index.remove_block(0)  # nothing indexed there: no event
    assert events.drain() == [(STORED, b"a"), (STORED, b"b"), (EVICTED, b"a")]
    blocks = BlockIndex(1)
    blocks.apply(0, "first", [(STORED, b"a"), (STORED, b"b"), (EVICTED, b"a")])
    assert blocks.keys_of(0) == {key for key, _ in index.items()}
    assert blocks.prefix_blocks(0, [b"b", b"c"]) == 1 and blocks.prefix_blocks(0, [b"a"]) == 0
    blocks.apply(0, "restarted", [])  # a new incarnation starts empty
    assert blocks.keys_of(0) == frozenset()


def test_a_stream_commits_at_its_first_token() -> None:
    role = b'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}\n\n'
    assert not has_token(role)
    assert has_token(b'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}\n\n')
    assert has_token(b'data: {"choices": [{"index": 0, "text": "Hi"}]}\n\n')
    assert has_token(b'data: {"error": {"message": "x"}}\n\n')
