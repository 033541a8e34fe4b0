"""RemoteTier on a real valkey-server/redis-server: round trip, damage, sharing, outages."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import redis
import torch

from strata.kv.tiers import block_format
from strata.kv.tiers.base import BlockLayout, StoredBlock
from strata.kv.tiers.disk import layout_digest
from strata.kv.tiers.remote import RemoteTier
from strata.kv.tiers.store_url import redis_url
from tests.redis_server import (
    RedisServer,
    running_server,
    server_binary,
    server_required,
    skip_without_server,
)

LAYOUT = BlockLayout(
    "ab" * 32, num_layers=2, num_kv_heads=2, head_dim=4, block_size=4, dtype="float16"
)
OTHER_MODEL = BlockLayout("cd" * 32, 2, 2, 4, 4, "float16")
VALUE = block_format.encoded_size(LAYOUT)
T = TypeVar("T")


def key(i: int) -> bytes:
    return hashlib.sha256(f"block {i}".encode()).digest()


def block(i: int, layout: BlockLayout = LAYOUT) -> StoredBlock:
    payload = (torch.arange(layout.nbytes, dtype=torch.int64) * (i + 7) % 251).to(torch.uint8)
    return StoredBlock(key(i), tuple(range(i, i + layout.block_size)), payload)


def encoded(b: StoredBlock, layout: BlockLayout = LAYOUT) -> bytes:
    return b"".join(block_format.encode(layout, b))


def test_server_binary_present_when_required() -> None:
    if not server_required():
        pytest.skip("neither CI nor STRATA_REQUIRE_REDIS=1 is set")
    assert server_binary() is not None, (
        "CI needs redis-server or valkey-server: ./install.sh --test"
    )


@pytest.fixture(scope="module")
def module_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    yield from running_server(tmp_path_factory)


@pytest.fixture
def server(module_server: RedisServer) -> RedisServer:
    """The module's server, running (a test may have stopped it) and empty."""
    if module_server.proc is None:
        module_server.start()
    redis.Redis.from_url(module_server.url).flushall()
    return module_server


def test_url_schemes() -> None:
    assert redis_url("valkey://h:1/0") == "redis://h:1/0"
    assert redis_url("valkeys://h:1") == "rediss://h:1"
    assert redis_url("redis://h:1") == "redis://h:1"


def test_round_trip_key_names_and_stats(server: RedisServer) -> None:
    tier = RemoteTier(LAYOUT, server.url.replace("redis://", "valkey://"))
    tier.put([block(0), block(1)])
    client = redis.Redis.from_url(server.url)
    prefix = f"strata:kv:{'ab' * 8}:{layout_digest(LAYOUT)}:"
    assert sorted(client.keys("*")) == sorted(f"{prefix}{key(i).hex()}".encode() for i in (0, 1))
    assert client.get(f"{prefix}{key(0).hex()}") == encoded(block(0))
    assert tier.contains([key(1), key(2), key(0)]) == [True, False, True]

    got = tier.get([key(0), key(2), key(1)])
    assert got[1] is None
    for i, b in ((0, got[0]), (1, got[2])):
        assert b is not None and b.key == key(i) and b.token_ids == block(i).token_ids
        assert torch.equal(b.payload, block(i).payload)
    s = tier.stats.snapshot()
    assert (s["hits"], s["misses"], s["corrupt"], s["errors"]) == (2, 1, 0, 0)
    assert (s["bytes_written"], s["bytes_read"]) == (2 * VALUE, 2 * VALUE)
    assert tier.used_bytes > 0  # the server's used_memory, read with INFO
    tier.close()


def test_put_keeps_the_first_value(server: RedisServer) -> None:
    tier = RemoteTier(LAYOUT, server.url)
    tier.put([block(0)])
    tier.put([StoredBlock(key(0), block(0).token_ids, block(1).payload), block(1)])  # SET NX
    (b,) = tier.get([key(0)])
    assert b is not None and torch.equal(b.payload, block(0).payload)
    assert tier.stats.snapshot()["bytes_written"] == 2 * VALUE  # block 0 once, block 1


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"garbage", "truncated"),
        (encoded(block(0))[:-10], "length"),
        (encoded(block(0))[:-1] + b"\0", "checksum mismatch"),
        (encoded(block(0, OTHER_MODEL), OTHER_MODEL), "model fingerprint mismatch"),
        (encoded(block(1)), "key mismatch"),
    ],
)
def test_bad_value_is_a_deleted_counted_miss(
    server: RedisServer, caplog: pytest.LogCaptureFixture, value: bytes, reason: str
) -> None:
    tier = RemoteTier(LAYOUT, server.url)
    client = redis.Redis.from_url(server.url)
    client.set(tier.name_of(key(0)), value)
    with caplog.at_level(logging.WARNING, logger="strata.kv.tiers.remote"):
        assert tier.get([key(0)]) == [None]
    assert reason in caplog.text
    assert client.exists(tier.name_of(key(0))) == 0
    s = tier.stats.snapshot()
    assert (s["hits"], s["misses"], s["corrupt"]) == (0, 1, 1)


def test_other_model_does_not_see_the_blocks(server: RedisServer) -> None:
    RemoteTier(LAYOUT, server.url).put([block(0)])
    other = RemoteTier(OTHER_MODEL, server.url)
    assert other.contains([key(0)]) == [False] and other.get([key(0)]) == [None]


WRITER = """
import sys, torch
from strata.kv.tiers.base import BlockLayout, StoredBlock
from strata.kv.tiers.remote import RemoteTier
layout = BlockLayout("ab" * 32, 2, 2, 4, 4, "float16")
payload = torch.full((layout.nbytes,), 42, dtype=torch.uint8)
RemoteTier(layout, sys.argv[1]).put([StoredBlock(bytes(32), (5, 6, 7, 8), payload)])
"""


def test_two_processes_share_blocks(server: RedisServer) -> None:
    mine = RemoteTier(LAYOUT, server.url)
    mine.put([block(0)])
    subprocess.run([sys.executable, "-c", WRITER, server.url], check=True, timeout=60)
    neighbour = RemoteTier(LAYOUT, server.url)  # a second client in this process
    for tier in (mine, neighbour):
        theirs, ours = tier.get([bytes(32), key(0)])
        assert theirs is not None and theirs.token_ids == (5, 6, 7, 8)
        assert torch.equal(theirs.payload, torch.full((LAYOUT.nbytes,), 42, dtype=torch.uint8))
        assert ours is not None and torch.equal(ours.payload, block(0).payload)


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.monotonic()
    result = fn()
    return result, time.monotonic() - start


def test_server_stopped_then_restarted(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    tier = RemoteTier(LAYOUT, server.url, timeout_s=0.5, retry_s=0.3)
    tier.put([block(0)])
    server.stop()
    with caplog.at_level(logging.WARNING, logger="strata.kv.tiers.remote"):
        got, first = _timed(lambda: tier.get([key(0), key(1)]))
        assert got == [None, None] and first < 2.0 and not tier.is_up
        calls = [
            _timed(lambda: tier.contains([key(0)])),
            _timed(lambda: tier.put([block(1)])),
            _timed(lambda: tier.get([key(0)])),
        ]
        assert [r for r, _ in calls] == [[False], None, [None]]
        assert max(t for _, t in calls) < 0.05  # down: instant misses, no network
        assert tier.stats.snapshot()["errors"] == 4
        assert caplog.text.count("unreachable") == 1

        server.start()  # same port, empty
        time.sleep(0.35)  # retry_s
        tier.put([block(1)])
        assert tier.is_up and "is back" in caplog.text
    (b,) = tier.get([key(1)])
    assert b is not None and torch.equal(b.payload, block(1).payload)


def test_server_hanging_times_out_then_recovers(server: RedisServer) -> None:
    tier = RemoteTier(LAYOUT, server.url, timeout_s=0.2, retry_s=0.3)
    tier.put([block(0)])
    server.pause()
    try:
        got, first = _timed(lambda: tier.get([key(0)]))
        assert got == [None] and first < 2.0 and not tier.is_up
        got, second = _timed(lambda: tier.get([key(0)]))
        assert got == [None] and second < 0.05
    finally:
        server.resume()
    time.sleep(0.35)
    (b,) = tier.get([key(0)])
    assert b is not None and torch.equal(b.payload, block(0).payload) and tier.is_up


def test_server_eviction_is_counted(tmp_path: Path) -> None:
    skip_without_server()
    layout = BlockLayout("ab" * 32, 4, 4, 64, 16, "float16")  # 64 KiB values
    with RedisServer(tmp_path, maxmemory="4mb") as small:
        tier = RemoteTier(layout, small.url, info_interval_s=0.0)
        payload = torch.zeros(layout.nbytes, dtype=torch.uint8)
        blocks = [StoredBlock(key(i), tuple(range(16)), payload) for i in range(200)]
        for i in range(0, 200, 20):
            tier.put(blocks[i : i + 20])
        assert sum(tier.contains([b.key for b in blocks])) < 100  # the server made room
        assert tier.contains([blocks[-1].key]) == [True]
        assert tier.stats.snapshot()["evictions"] > 0 and tier.stats.errors == 0


def test_full_server_without_eviction_skips_blocks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    skip_without_server()
    layout = BlockLayout("ab" * 32, 4, 4, 64, 16, "float16")  # 64 KiB values
    with RedisServer(tmp_path, maxmemory="2mb", policy="noeviction") as full:
        tier = RemoteTier(layout, full.url)
        payload = torch.zeros(layout.nbytes, dtype=torch.uint8)
        blocks = [StoredBlock(key(i), tuple(range(16)), payload) for i in range(100)]
        with caplog.at_level(logging.WARNING, logger="strata.kv.tiers.remote"):
            for i in range(0, 100, 10):
                tier.put(blocks[i : i + 10])  # OOM answers: skipped, never raised
        stored = sum(tier.contains([b.key for b in blocks]))
        assert 0 < stored < 100 and tier.stats.errors == 100 - stored
        assert caplog.text.count("maxmemory") == 1 and tier.is_up


def test_pins_are_bookkeeping(server: RedisServer) -> None:
    tier = RemoteTier(LAYOUT, server.url)
    tier.pin([key(0), key(0)])
    tier.unpin([key(0)])
    assert tier.is_pinned(key(0))
    tier.unpin([key(0)])
    assert not tier.is_pinned(key(0)) and tier.evict(1 << 20) == 0
