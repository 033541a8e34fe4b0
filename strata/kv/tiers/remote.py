"""The remote tier: blocks as values on a Valkey or Redis server that many engines share.

    key    strata:kv:<fingerprint[:16]>:<layout digest>:[<secret tag>:]<block key hex>
    value  block_format bytes (header + token ids + payload, checksummed, or with a
           store secret authenticated by a MAC)

    contains = pipelined EXISTS                      remove = DEL
    get      = MGETs of about MGET_BYTES each, on `read_threads` connections at once, each
               value checked (and copied into its cpu slot) on the thread that read it
    put      = pipelined SET NX, sent by a writer process (remote_writer.py) so that the
               engine's threads do not wait for the GIL while a write-through drains

Capacity and eviction belong to the server: run it with `maxmemory <bytes>` and
`maxmemory-policy allkeys-lru` (or allkeys-lfu), so old blocks make room for new ones.
`capacity_bytes` is informative, `evict` frees nothing, and `used_bytes` and
`stats.evictions` are the server's `used_memory` and `evicted_keys` (all clients' keys)
as read with INFO at most every `info_interval_s`. Pins are counted here only: keeping a
key from the server's eviction (PERSIST under a volatile-* policy) would outlive a
crashed engine and be undone by another engine's unpin, so it is not done.

Degradation, so that the engine never waits on a sick server:

    up --(connection error or timeout, each bounded by timeout_s)--> down   log WARNING once
    down: every call is an instant miss/skip, counted in stats.errors
    down --(retry_s elapsed: next call drops the pool's sockets, tries again)--> up   log

A value that does not decode (other model or layout, truncated, bad checksum) is a miss,
logged, deleted and counted in `stats.corrupt`. Every method (`contains` too: it is a
network call) is called from the io thread only (the reader threads are its helpers);
`get`'s payloads are views over the bytes MGET returned, so they stay valid; a failure of
the writer process counts as the server being unreachable.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar
from urllib.parse import urlsplit

import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from strata.kv.tiers import block_format
from strata.kv.tiers.base import BlockLayout, PinCounts, StoredBlock, TierStore, Timer
from strata.kv.tiers.disk import layout_digest
from strata.kv.tiers.remote_writer import RemoteWriter
from strata.kv.tiers.store_secret import StoreSecret
from strata.kv.tiers.store_url import redact_url, redis_url

log = logging.getLogger(__name__)

T = TypeVar("T")
_Checked = StoredBlock | block_format.BlockFormatError | None  # a value read back
UNBOUNDED = 1 << 60  # capacity_bytes when the server's maxmemory is the only cap
PASSWORD_ENV = "STRATA_KV_REMOTE_PASSWORD"
READ_THREADS = 8  # MGETs in flight at once, one connection each
# Bytes per MGET: redis-py parses a reply of many large values slowly (0.5 GB/s with one
# MGET per 64 blocks of 2 MiB on an H200 host), so a few blocks per MGET, many in flight.
MGET_BYTES = 8 << 20
# Failures that mean "the server is not answering": the tier goes down on these.
_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, OSError)


class RemoteTier(TierStore):
    name = "remote"
    is_local = False  # every call is a network round trip

    def __init__(
        self,
        layout: BlockLayout,
        url: str,
        capacity_bytes: int | None = None,
        timeout_s: float = 0.5,
        retry_s: float = 2.0,
        info_interval_s: float = 5.0,
        secret: StoreSecret | None = None,
        read_threads: int = READ_THREADS,
    ) -> None:
        """secret: authenticate every block (store_secret.py), under a key prefix of its
        own. The password is the URL's, else $STRATA_KV_REMOTE_PASSWORD; logs show the
        URL without it. read_threads: MGETs in flight at once."""
        super().__init__(layout, UNBOUNDED if capacity_bytes is None else capacity_bytes)
        self.url = redact_url(url)  # what logs and describe() show
        self.secret = secret
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.info_interval_s = info_interval_s
        namespace = f"strata:kv:{layout.fingerprint[:16]}:{layout_digest(layout)}:"
        if secret is not None:
            namespace += f"{secret.namespace}:"
        self.prefix = namespace.encode()
        # One immediate retry on a dropped connection (a restarted server leaves stale
        # pooled sockets); none on a timeout, so one call costs at most ~2 * timeout_s.
        password = None if urlsplit(url).password else os.environ.get(PASSWORD_ENV)
        self._client = redis.Redis.from_url(
            redis_url(url),
            password=password,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
            health_check_interval=0,
        )
        self._down = False
        self._next_try = 0.0
        self._next_info = 0.0
        self._evicted_seen: int | None = None  # evicted_keys at the last INFO
        self._used_memory = 0
        self._pins = PinCounts()
        self._warned: set[str] = set()
        value_bytes = block_format.encoded_size(layout, secret)
        self._per_mget = max(1, MGET_BYTES // value_bytes)
        self.read_batch = read_threads * self._per_mget
        self._readers = ThreadPoolExecutor(read_threads, thread_name_prefix="strata-kv-remote")
        self._value_bytes = value_bytes
        self._writer = RemoteWriter(redis_url(url), password, timeout_s, layout, secret)

    @property
    def used_bytes(self) -> int:
        return self._used_memory

    @property
    def is_up(self) -> bool:
        return not self._down

    def name_of(self, key: bytes) -> bytes:
        return self.prefix + key.hex().encode()

    # ---- the one place that talks to the server ----------------------------------------

    def _call(self, what: str, fn: Callable[[], T]) -> T | None:
        """fn() against the server, or None (counted) if it is down or just failed."""
        now = time.monotonic()
        if self._down:
            if now < self._next_try:
                self.stats.add(errors=1)
                return None
            self._client.connection_pool.disconnect()
        try:
            result = fn()
        except _UNREACHABLE as exc:
            self.stats.add(errors=1)
            self._next_try = time.monotonic() + self.retry_s
            if not self._down:
                self._down = True
                log.warning(
                    "remote KV tier %s unreachable (%s: %s); misses until it is back, retrying "
                    "every %.1f s", self.url, what, exc, self.retry_s,
                )  # fmt: skip
            self._client.connection_pool.disconnect()
            return None
        except redis.RedisError as exc:  # the server answered with an error (e.g. OOM)
            self.stats.add(errors=1)
            self._warn_once(exc, what)
            return None
        if self._down:
            self._down = False
            log.warning("remote KV tier %s is back", self.url)
        return result

    def _warn_once(self, exc: Exception, what: str) -> None:
        """An error answer from the server: WARNING the first time per kind, then DEBUG."""
        kind = type(exc).__name__  # e.g. OutOfMemoryError, ResponseError
        level = logging.DEBUG if kind in self._warned else logging.WARNING
        self._warned.add(kind)
        log.log(level, "remote KV tier %s: %s failed (%s); skipped", self.url, what, exc)

    # ---- queries ----------------------------------------------------------------------

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        def exists() -> list[bool]:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(self.name_of(key))
            return [bool(n) for n in pipe.execute()]

        found = self._call("EXISTS", exists) if keys else []
        return [False] * len(keys) if found is None else found

    def get(self, keys: Sequence[bytes]) -> list[StoredBlock | None]:
        """Payloads are views of the bytes MGET returned: valid as long as they are kept."""
        return self._get(keys, [None] * len(keys))

    def get_into(
        self, keys: Sequence[bytes], dests: Sequence[torch.Tensor]
    ) -> list[StoredBlock | None]:
        return self._get(keys, dests)

    def _get(
        self, keys: Sequence[bytes], dests: Sequence[torch.Tensor | None]
    ) -> list[StoredBlock | None]:
        if not keys:
            return []
        per = self._per_mget
        batches = [(keys[i : i + per], dests[i : i + per]) for i in range(0, len(keys), per)]

        def read_all() -> list[tuple[int, list[_Checked]]]:
            if len(batches) == 1:
                return [self._mget(*batches[0])]
            return list(self._readers.map(lambda b: self._mget(*b), batches))

        with Timer() as t:
            answers = self._call("MGET", read_all)
        if answers is None:
            self.stats.add(misses=len(keys))
            return [None] * len(keys)
        self.stats.add(bytes_read=sum(n for n, _ in answers), read_seconds=t.seconds)
        checked = [c for _, batch in answers for c in batch]
        out = [c if c is None else self._accept(k, c) for k, c in zip(keys, checked, strict=True)]
        hits = sum(b is not None for b in out)
        self.stats.add(hits=hits, misses=len(keys) - hits)
        self._refresh_info()
        return out

    def _mget(
        self, keys: Sequence[bytes], dests: Sequence[torch.Tensor | None]
    ) -> tuple[int, list[_Checked]]:
        """One MGET on a reader thread: (bytes read, each value checked and, with a
        destination, copied there; None where absent)."""
        values = self._client.mget([self.name_of(k) for k in keys])
        out: list[_Checked] = []
        for key, value, dest in zip(keys, values, dests, strict=True):
            if not isinstance(value, bytes):
                out.append(None)
                continue
            try:
                block = block_format.decode(self.layout, value, key, self.secret)
            except block_format.BlockFormatError as exc:
                out.append(exc)
                continue
            if dest is not None:
                dest.copy_(block.payload)
                block = StoredBlock(key, block.token_ids, dest)
            out.append(block)
        return sum(len(v) for v in values if isinstance(v, bytes)), out

    def _accept(
        self, key: bytes, result: StoredBlock | block_format.BlockFormatError
    ) -> StoredBlock | None:
        """The block, or None for one that failed its checks (logged, counted, deleted)."""
        if isinstance(result, StoredBlock):
            return result
        log.warning("remote KV tier: rejecting %s: %s", self.name_of(key).decode(), result)
        self.stats.add(corrupt=1)
        self._call("DEL", lambda: self._client.delete(self.name_of(key)))
        return None

    # ---- writes ---------------------------------------------------------------------------

    def put(self, blocks: Sequence[StoredBlock]) -> None:
        if not blocks:
            return
        items = [(self.name_of(b.key), b) for b in blocks]
        with Timer() as t:
            results = self._call("SET", lambda: self._writer.write(items))
        if results is None:
            return
        written = self._value_bytes * sum(r is True for r in results)
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:  # e.g. OOM under maxmemory-policy noeviction: the block is skipped
            self.stats.add(errors=len(failed))
            self._warn_once(failed[0], f"{len(failed)} of {len(blocks)} SETs")
        self.stats.add(bytes_written=written, write_seconds=t.seconds)
        self._refresh_info()

    def remove(self, keys: Sequence[bytes]) -> None:
        for key in keys:
            self._pins.forget(key)
        if keys:
            self._call("DEL", lambda: self._client.delete(*[self.name_of(k) for k in keys]))

    # ---- pins and eviction: the server decides ------------------------------------------

    def pin(self, keys: Sequence[bytes]) -> None:
        self._pins.add(keys)

    def unpin(self, keys: Sequence[bytes]) -> None:
        self._pins.drop(keys)

    def is_pinned(self, key: bytes) -> bool:
        return key in self._pins

    def evict(self, num_bytes: int) -> int:
        return 0  # the server evicts by its maxmemory-policy

    def _refresh_info(self) -> None:
        """used_bytes and stats.evictions from INFO, at most every info_interval_s."""
        now = time.monotonic()
        if self._down or now < self._next_info:
            return
        self._next_info = now + self.info_interval_s
        info = self._call(
            "INFO", lambda: {**self._client.info("memory"), **self._client.info("stats")}
        )
        if info is None:
            return
        self._used_memory = int(info.get("used_memory", 0))
        evicted = int(info.get("evicted_keys", 0))
        if self._evicted_seen is not None and evicted >= self._evicted_seen:
            self.stats.add(evictions=evicted - self._evicted_seen)
        self._evicted_seen = evicted  # a restarted server counts from 0 again

    def close(self) -> None:
        self._writer.close()
        self._readers.shutdown(wait=True)
        self._client.close()

    def describe(self) -> str:
        cap = (
            "server maxmemory"
            if self.capacity_bytes == UNBOUNDED
            else (f"{self.capacity_bytes / (1 << 30):.2f} GiB")
        )
        return f"remote {self.url} ({cap})"
