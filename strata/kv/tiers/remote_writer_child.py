"""The remote tier's writer process: SET NX of values that the parent put in a shared ring.

remote_writer.py runs this file by path. It imports only the standard library and redis,
so it starts in a fraction of a second, and its work never holds the engine's GIL.

    argv: <socket fd> <ring fd>
    parent --{url, password, timeout_s, ring_bytes}--> here --("ready",)--> parent
    parent --(batch id, [(ring offset, key name, value bytes), ...])--> one pipelined SET NX
    parent <--(batch id, [True (set) | None (already there) | exception (refused), ...])
           <--(batch id, ("down", message)): the server did not answer
    parent --None, or the socket closes--> exit
"""

from __future__ import annotations

import mmap
import sys
from multiprocessing.connection import Connection
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, OSError)


def _client(setup: dict[str, Any]) -> redis.Redis:
    """Timeouts and retries as the parent's own client (remote.py)."""
    timeout = setup["timeout_s"]
    return redis.Redis.from_url(
        setup["url"],
        password=setup["password"],
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        health_check_interval=0,
    )


def set_all(client: redis.Redis, ring: memoryview, items: list[tuple[int, bytes, int]]) -> Any:
    """One pipelined SET NX per item, each value a view of the ring (no copy)."""
    pipe = client.pipeline(transaction=False)
    for offset, name, nbytes in items:
        pipe.set(name, ring[offset : offset + nbytes], nx=True)
    try:
        return pipe.execute(raise_on_error=False)
    except UNREACHABLE as exc:
        client.connection_pool.disconnect()
        return ("down", f"{type(exc).__name__}: {exc}")
    except redis.RedisError as exc:  # an answer that fails the whole pipeline
        return [exc] * len(items)


def main() -> None:
    conn = Connection(int(sys.argv[1]))
    setup = conn.recv()
    ring = memoryview(mmap.mmap(int(sys.argv[2]), setup["ring_bytes"]))
    client = _client(setup)
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        batch_id, items = message
        try:
            conn.send((batch_id, set_all(client, ring, items)))
        except OSError:  # the parent gave up on us
            return


if __name__ == "__main__":
    main()
