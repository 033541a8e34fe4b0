"""Run one HTTP request through an ASGI app in this process and yield its response as
it is sent: first {"status", "headers"}, then {"body": bytes} per chunk, so a stream
stays a stream across the Ray call. Closing the generator is a client disconnect."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.types import ASGIApp, Message


def http_scope(request: dict[str, Any]) -> dict[str, Any]:
    """request: method, path, query (bytes), headers (list of (name, value) strings)."""
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": request["method"], "scheme": "http", "root_path": "",
        "path": request["path"], "raw_path": request["path"].encode(),
        "query_string": request.get("query", b""),
        "headers": [(k.lower().encode(), v.encode()) for k, v in request["headers"]],
        "client": ("strata-front", 0), "server": ("strata-replica", 0),
    }  # fmt: skip


async def asgi_call(app: ASGIApp, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    sent: asyncio.Queue[Message | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_given = False

    async def receive() -> Message:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.get("body", b""), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await sent.put(message)

    async def run() -> None:
        try:
            await app(http_scope(request), receive, send)
        finally:
            await sent.put(None)

    task = asyncio.create_task(run())
    try:
        while (message := await sent.get()) is not None:
            if message["type"] == "http.response.start":
                headers = [(k.decode(), v.decode()) for k, v in message.get("headers", [])]
                yield {"status": message["status"], "headers": headers}
            elif message["type"] == "http.response.body":
                yield {"body": bytes(message.get("body", b""))}
                if not message.get("more_body", False):
                    break
    finally:
        gone.set()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
