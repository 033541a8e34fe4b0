"""Relay one HTTP request to a replica and its response back, with retries.

    replica's messages:  start ─ body ─ body ─ ... ─ last body
                         └ held back ┘│ committed: forwarded as they come
                                      └ the first SSE chunk with a token (or the end)

Until committed, nothing has reached the client, so a replica failure there sends the
request to another replica (each tried once). After it, a failure ends an event stream
with an error event and [DONE]. A JSON response commits only when complete.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import Response, StreamingResponse

from strata.server.errors import server_error, unavailable
from strata.server.replicas.front import Front, NoReplicaError
from strata.server.responses import SSE_DONE, sse

REPLICA_HEADER = "x-strata-replica"
DROPPED_HEADERS = {"content-length", "transfer-encoding", "connection"}


class ReplicaFailed(Exception):
    """The replica's response broke off before it was complete."""


def has_token(chunk: bytes) -> bool:
    """An SSE chunk that carries generated output (text, tool calls, token ids, an
    error or a finish): past it, a retry could repeat what the client saw."""
    for line in chunk.decode(errors="replace").splitlines():
        if not line.startswith("data: ") or line == SSE_DONE.strip():
            continue
        try:
            payload = json.loads(line[6:])
        except ValueError:
            return True
        if "error" in payload:
            return True
        for choice in payload.get("choices", []):
            delta = choice.get("delta", {})
            if choice.get("text") or choice.get("finish_reason") or choice.get("token_ids"):
                return True
            if delta.get("content") or delta.get("tool_calls"):
                return True
    return False


async def _next(stream: Any) -> dict[str, Any] | None:
    try:
        return dict(await stream.__anext__())
    except StopAsyncIteration:
        return None
    except Exception as exc:
        raise ReplicaFailed(str(exc)) from exc


async def _until_committed(stream: Any) -> tuple[dict[str, Any], list[bytes], bool]:
    """(start message, body chunks held back, whether the response is complete)."""
    start = await _next(stream)
    if start is None or "status" not in start:
        raise ReplicaFailed("the replica ended the response before it began")
    sse_stream = any(
        k.lower() == "content-type" and v.startswith("text/event-stream")
        for k, v in start["headers"]
    )  # fmt: skip
    held: list[bytes] = []
    while (message := await _next(stream)) is not None:
        held.append(message["body"])
        if sse_stream and has_token(message["body"]):
            return start, held, False
    if not sse_stream and not held:
        raise ReplicaFailed("the replica ended the response without a body")
    return start, held, True


async def relay(front: Front, request: dict[str, Any], keys: list[bytes]) -> Response:
    tried: set[int] = set()
    while True:
        try:
            decision = front.choose(keys, tried)
        except NoReplicaError as exc:
            raise unavailable(f"{exc}; tried {len(tried)} replicas") from exc
        replica = decision.replica
        tried.add(replica)
        front.in_flight[replica] += 1
        stream = front.handles[replica].options(stream=True).handle.remote(request)
        try:
            start, held, complete = await _until_committed(stream)
        except asyncio.CancelledError:  # the client left before the response began
            front.in_flight[replica] -= 1
            stream.cancel()
            raise
        except Exception:  # ReplicaFailed, or the call itself failed
            front.in_flight[replica] -= 1
            stream.cancel()
            front.up[replica] = False
            front.metrics.retries.inc()
            continue
        return _response(front, replica, stream, start, held, complete)


def _response(
    front: Front, replica: int, stream: Any, start: dict[str, Any], held: list[bytes],
    complete: bool,
) -> Response:
    headers = {k: v for k, v in start["headers"] if k.lower() not in DROPPED_HEADERS}
    headers[REPLICA_HEADER] = f"replica-{replica}"
    if complete:
        front.in_flight[replica] -= 1
        return Response(b"".join(held), start["status"], headers)

    async def body() -> AsyncIterator[bytes]:
        try:
            for chunk in held:
                yield chunk
            while (message := await _next(stream)) is not None:
                yield message["body"]
        except ReplicaFailed as exc:
            front.metrics.cut_streams.inc()
            error = server_error(f"replica-{replica} failed mid-stream: {exc}")
            yield (sse(error.body()) + SSE_DONE).encode()
        finally:
            stream.cancel()
            front.in_flight[replica] -= 1

    return StreamingResponse(body(), start["status"], headers)
