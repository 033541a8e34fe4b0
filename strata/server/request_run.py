"""RequestRun: the engine requests (choices) behind one HTTP request, and their timing.

It merges the choices' output streams in arrival order, records time to first token
and end-to-end latency per choice into the metrics, logs one line per HTTP request,
and aborts every unfinished choice when closed (a client that went away).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.requests import Request

from strata.engine.front import RequestStream
from strata.engine.outputs import RequestOutput
from strata.server.metrics import ServerMetrics

logger = logging.getLogger("strata.server")

DISCONNECT_POLL_S = 0.25


class ClientDisconnected(Exception):
    """The HTTP client went away before its response was complete."""


@dataclass
class RequestRun:
    request_id: str
    streams: list[RequestStream]
    metrics: ServerMetrics
    arrival: float = field(default_factory=time.perf_counter)
    finals: list[RequestOutput | None] = field(init=False)
    first_token_at: list[float | None] = field(init=False)
    _closed: bool = False

    def __post_init__(self) -> None:
        self.finals = [None] * len(self.streams)
        self.first_token_at = [None] * len(self.streams)

    def _record(self, index: int, out: RequestOutput) -> None:
        if self.first_token_at[index] is None and out.token_ids:
            self.first_token_at[index] = time.perf_counter()
        if out.finished:
            self.finals[index] = out

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) as the engine produces them, until all have finished."""
        if len(self.streams) == 1:
            async for out in self.streams[0]:
                self._record(0, out)
                yield 0, out
            return
        merged: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            async for out in stream:
                await merged.put((index, out))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            remaining = len(self.streams)
            while remaining:
                index, out = await merged.get()
                self._record(index, out)
                remaining -= out.finished
                yield index, out
        finally:
            for t in tasks:
                t.cancel()

    async def collect(self, request: Request) -> list[RequestOutput]:
        """Every choice's final output; raises ClientDisconnected if the client leaves."""

        async def drain() -> None:
            async for _ in self.outputs():
                pass

        task = asyncio.create_task(drain())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    task.result()
                    break
                if await request.is_disconnected():
                    raise ClientDisconnected(self.request_id)
        finally:
            task.cancel()
        return [out for out in self.finals if out is not None]

    def close(self, status: str = "ok") -> None:
        """Abort unfinished choices, observe metrics and log the request (once)."""
        if self._closed:
            return
        self._closed = True
        for stream in self.streams:
            stream.close()
        now = time.perf_counter()
        prompt = cached = completion = 0
        reasons = []
        first: float | None = None
        for i, out in enumerate(self.finals):
            ttft = None
            if self.first_token_at[i] is not None:
                ttft = self.first_token_at[i] - self.arrival  # type: ignore[operator]
                first = ttft if first is None else min(first, ttft)
            if out is None:
                self.metrics.observe(ttft, now - self.arrival, 0, "abort")
                reasons.append("abort")
                continue
            self.metrics.observe(ttft, now - self.arrival, len(out.token_ids), out.finish_reason)
            prompt += len(out.prompt_token_ids)
            cached += out.num_cached_tokens
            completion += len(out.token_ids)
            reasons.append(out.finish_reason or "?")
        logger.info(
            "%s: %s, %d choices, prompt %d tokens (%d cached), completion %d tokens, "
            "finish %s, ttft %s, e2e %.3f s",
            self.request_id, status, len(self.streams), prompt, cached, completion,
            ",".join(sorted(set(reasons))),
            "-" if first is None else f"{first:.3f} s", now - self.arrival,
        )  # fmt: skip
