"""Routers and the router's block index, without Ray: exact choices and reasons."""

from __future__ import annotations

import asyncio
import typing
from typing import Any

from fastapi.responses import StreamingResponse

from strata.kv.index_events import EVICTED, STORED, IndexEvents
from strata.kv.prefix import PrefixIndex
from strata.server.config import RouterName, ServeConfig
from strata.server.replicas.block_index import BlockIndex
from strata.server.replicas.front import Front
from strata.server.replicas.relay import has_token, relay
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
    index = PrefixIndex()
    index.listener = events
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


class FakeReplica:
    """A replica handle whose streamed `handle` call yields `messages`, then raises."""

    def __init__(self, messages: list[dict[str, Any]], fails: bool) -> None:
        self.messages, self.fails, self.calls = messages, fails, 0

    def options(self, stream: bool) -> FakeReplica:
        return self

    @property
    def handle(self) -> FakeReplica:
        return self

    def remote(self, request: dict[str, Any]) -> FakeStream:
        self.calls += 1
        return FakeStream(self)


class FakeStream:
    def __init__(self, replica: FakeReplica) -> None:
        self.items = iter(replica.messages)
        self.fails = replica.fails

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        item = next(self.items, None)
        if item is not None:
            return item
        if self.fails:
            raise RuntimeError("the actor died")
        raise StopAsyncIteration

    def cancel(self) -> None:
        pass


SSE = {"status": 200, "headers": [("content-type", "text/event-stream")]}
TOKEN = b'data: {"choices": [{"index": 0, "text": "Hi"}]}\n\n'


async def _relayed(replicas: list[FakeReplica]) -> tuple[Front, Any, bytes]:
    front = Front(replicas, ServeConfig(replicas=len(replicas)), "m")
    response = await relay(front, {}, [])
    if isinstance(response, StreamingResponse):
        body = b"".join([chunk async for chunk in response.body_iterator])  # type: ignore[misc]
    else:
        body = bytes(response.body)
    return front, response, body


def test_a_failure_before_the_first_token_is_retried_on_another_replica() -> None:
    dead = FakeReplica([SSE, {"body": b'data: {"choices": [{"delta": {"role": "x"}}]}\n\n'}], True)
    alive = FakeReplica([SSE, {"body": TOKEN}, {"body": b"data: [DONE]\n\n"}], False)
    front, response, body = asyncio.run(_relayed([dead, alive]))
    assert (dead.calls, alive.calls) == (1, 1)
    assert response.headers["x-strata-replica"] == "replica-1"
    assert body == TOKEN + b"data: [DONE]\n\n"
    assert front.metrics.retries._value.get() == 1 and front.in_flight == [0, 0]


def test_a_failure_after_a_token_ends_the_stream_with_an_error_and_done() -> None:
    cut = FakeReplica([SSE, {"body": TOKEN}], True)
    front, _, body = asyncio.run(_relayed([cut, FakeReplica([], False)]))
    events = body.decode().split("\n\n")
    assert events[0] == TOKEN.decode().strip() and '"error"' in events[1]
    assert events[2] == "data: [DONE]" and front.in_flight == [0, 0]
