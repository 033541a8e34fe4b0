"""RemoteTier's parallel reads (several MGETs at once, straight into cpu slots) and its
writer process, on a real valkey-server/redis-server."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator

import pytest
import redis
import torch

from strata.kv.tiers.remote import RemoteTier
from strata.kv.tiers.store_secret import StoreSecret
from tests.redis_server import RedisServer, running_server
from tests.test_tier_parallel_reads import LAYOUT, N, block, key

# 16 KiB blocks: MGETs of 8 MiB would hold every block, so the tests shrink them


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    yield from running_server(tmp_path_factory)


def small_mgets(tier: RemoteTier, per: int = 3) -> RemoteTier:
    tier._per_mget = per  # several MGETs per call, on several reader threads
    return tier


@pytest.mark.parametrize("secret", [None, StoreSecret.of(b"s" * 16)])
def test_parallel_reads_into_slots_are_byte_identical(
    server: RedisServer, secret: StoreSecret | None
) -> None:
    redis.Redis.from_url(server.url).flushall()
    tier = small_mgets(RemoteTier(LAYOUT, server.url, secret=secret, read_threads=4))
    tier.put([block(i) for i in range(N)])
    slab = torch.zeros((N + 1, LAYOUT.nbytes), dtype=torch.uint8)
    keys = [key(i) for i in range(N)] + [key(999)]
    got = tier.get_into(keys, list(slab))
    assert got[-1] is None
    for i, b in enumerate(got[:-1]):
        assert b is not None and b.key == key(i) and b.token_ids == block(i).token_ids
        assert b.payload.data_ptr() == slab[i].data_ptr() and torch.equal(slab[i], block(i).payload)
    plain = tier.get(keys[:N])
    assert all(b is not None and torch.equal(b.payload, block(i).payload)
               for i, b in enumerate(plain))  # fmt: skip
    s = tier.stats.snapshot()
    assert (s["hits"], s["misses"], s["corrupt"], s["errors"]) == (2 * N, 1, 0, 0)
    tier.close()


def test_a_flipped_byte_among_parallel_reads_is_caught(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis.Redis.from_url(server.url)
    client.flushall()
    tier = small_mgets(RemoteTier(LAYOUT, server.url, read_threads=4))
    tier.put([block(i) for i in range(N)])
    for i in (5, 17, 33):
        value = bytearray(client.get(tier.name_of(key(i))) or b"")
        value[-1 - i] ^= 0x01
        client.set(tier.name_of(key(i)), bytes(value))
    slab = torch.zeros((N, LAYOUT.nbytes), dtype=torch.uint8)
    with caplog.at_level(logging.WARNING, logger="strata.kv.tiers.remote"):
        got = tier.get_into([key(i) for i in range(N)], list(slab))
    assert [i for i, b in enumerate(got) if b is None] == [5, 17, 33]
    assert caplog.text.count("checksum mismatch") == 3
    assert tier.stats.snapshot()["corrupt"] == 3
    assert tier.contains([key(5), key(17), key(33), key(6)]) == [False, False, False, True]
    tier.close()


def test_writes_go_through_a_process_replaced_when_it_dies_or_hangs(
    server: RedisServer,
) -> None:
    redis.Redis.from_url(server.url).flushall()
    tier = RemoteTier(LAYOUT, server.url, retry_s=0.1)
    tier.put([block(0)])
    first = tier._writer._proc
    assert first is not None and first.poll() is None  # a process of its own
    first.kill()
    first.wait()
    tier.put([block(1)])  # a dead writer is replaced before the write
    second = tier._writer._proc
    assert second is not None and second.pid != first.pid
    assert tier.stats.snapshot()["errors"] == 0

    tier._writer.answer_timeout_s = 0.3
    os.kill(second.pid, signal.SIGSTOP)  # a hung writer: killed, the tier down for retry_s
    tier.put([block(2)])
    assert tier.stats.snapshot()["errors"] == 1 and not tier.is_up
    assert second.poll() is not None and tier._writer._proc is None
    time.sleep(0.15)
    tier.put([block(3)])  # a fresh writer
    assert tier.is_up
    assert tier.contains([key(i) for i in range(4)]) == [True, True, False, True]
    tier.close()
