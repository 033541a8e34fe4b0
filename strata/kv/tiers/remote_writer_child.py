"""The remote tier's writer process: encodes the blocks the parent put in a shared ring
and sends them with SET NX.

remote_writer.py runs this file by path. It loads block_format under a bare `strata`
package (not the package's __init__, which imports the engine), so it starts in about
a second, and its work (checksums, MACs, joins, redis-py) never holds the engine's GIL.

    argv: <socket fd> <ring fd>
    parent --{url, password, timeout_s, slots, layout, secret}--> here --("ready",)-->
    parent --(batch id, [(slot, key name, block key, token ids), ...])--> encode each
             payload ring[slot]; one pipelined SET NX for the batch
    parent <--(batch id, [True (set) | None (already there) | exception (refused), ...])
           <--(batch id, ("down", message)): the server did not answer
    parent --None, or the socket closes--> exit
"""

from __future__ import annotations

import mmap
import sys
import types
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, OSError)


def _bare_strata() -> None:
    """`strata` as a package over this checkout's folder, without running its __init__."""
    if "strata" not in sys.modules:
        package = types.ModuleType("strata")
        package.__path__ = [str(Path(__file__).resolve().parents[2])]
        sys.modules["strata"] = package


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


class Encoder:
    """Blocks of the ring as block_format values."""

    def __init__(self, setup: dict[str, Any], ring_fd: int) -> None:
        _bare_strata()
        import torch

        from strata.kv.tiers import block_format
        from strata.kv.tiers.base import StoredBlock

        self.layout, self.secret = setup["layout"], setup["secret"]
        self._encode, self._block = block_format.encode, StoredBlock
        nbytes = self.layout.nbytes
        self._mmap = mmap.mmap(ring_fd, setup["slots"] * nbytes)
        self.ring = torch.frombuffer(self._mmap, dtype=torch.uint8).view(setup["slots"], nbytes)

    def value(self, slot: int, key: bytes, token_ids: tuple[int, ...]) -> bytes:
        block = self._block(key, token_ids, self.ring[slot])
        return b"".join(self._encode(self.layout, block, self.secret))


def set_all(client: redis.Redis, encoder: Encoder, items: list[tuple[Any, ...]]) -> Any:
    """One pipelined SET NX per item; a block that does not encode is its ValueError."""
    pipe = client.pipeline(transaction=False)
    refused: dict[int, ValueError] = {}
    for i, (slot, name, key, token_ids) in enumerate(items):
        try:
            pipe.set(name, encoder.value(slot, key, token_ids), nx=True)
        except ValueError as exc:
            refused[i] = exc
    try:
        answers = iter(pipe.execute(raise_on_error=False) if len(pipe) else [])
    except UNREACHABLE as exc:
        client.connection_pool.disconnect()
        return ("down", f"{type(exc).__name__}: {exc}")
    except redis.RedisError as exc:  # an answer that fails the whole pipeline
        return [exc] * len(items)
    return [refused[i] if i in refused else next(answers) for i in range(len(items))]


def main() -> None:
    _bare_strata()  # the setup's layout and secret unpickle from this checkout's modules
    conn = Connection(int(sys.argv[1]))
    setup = conn.recv()
    encoder = Encoder(setup, int(sys.argv[2]))
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
            conn.send((batch_id, set_all(client, encoder, items)))
        except OSError:  # the parent gave up on us
            return


if __name__ == "__main__":
    main()
