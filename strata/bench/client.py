"""A streaming client for OpenAI-compatible servers that times and checks every chunk.

One request is one streamed completion with `ignore_eos` and `max_tokens` set, so its
output length is exact. A response is well formed when it is a 200 with SSE `data:`
lines, each a JSON chunk with a `choices` list (or an `error`, which fails it), at least
one chunk with non-empty content, a `finish_reason`, and `data: [DONE]` last. The usage
chunk (`stream_options.include_usage`) is asked for; without it the output tokens are
counted as content chunks.

Outcomes: "ok"; "failed" (non-200, error chunk, malformed chunk, no [DONE], transport
error); "lost" (the server went silent past the timeout, or the run ended first).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import httpx

from strata.bench.latency import CompletedRequest, tpot_ms
from strata.errors import StrataError

Endpoint = Literal["completions", "chat"]
Outcome = Literal["ok", "failed", "lost"]


class BenchmarkError(StrataError):
    """A benchmark that could not run, or whose requests failed or were lost."""


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload. `prompt_len` is exact for token-id prompts and the word
    count for text prompts (the server's usage gives the exact count)."""

    index: int
    prompt: str | list[int]
    prompt_len: int
    output_len: int


@dataclass
class RequestRecord:
    """What one request did; times in ms, `sent_s` from the start of the run."""

    index: int
    outcome: Outcome
    error: str | None = None
    sent_s: float = 0.0
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    input_tokens: int | None = None
    output_tokens: int | None = None
    expected_output_tokens: int = 0
    cached_tokens: int | None = None
    usage_reported: bool = False
    content_chunks: int = 0

    @property
    def tpot_ms(self) -> float | None:
        if self.ttft_ms is None or self.e2e_ms is None or self.output_tokens is None:
            return None
        return tpot_ms(self.e2e_ms, self.ttft_ms, self.output_tokens)

    def completed(self) -> CompletedRequest:
        assert self.outcome == "ok" and self.ttft_ms is not None and self.e2e_ms is not None
        return CompletedRequest(
            self.ttft_ms, self.tpot_ms, tuple(self.itl_ms), self.e2e_ms,
            self.input_tokens or 0, self.output_tokens or 0,
        )  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tpot_ms": self.tpot_ms}


class MalformedStreamError(Exception):
    """A stream that breaks the OpenAI chunk format (the message says how)."""


@dataclass
class StreamParser:
    """Parses SSE lines of one response as they arrive, with their arrival times."""

    endpoint: Endpoint
    content_times: list[float] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    done: bool = False

    def feed(self, line: str, now: float) -> None:
        if not line or line.startswith(":"):
            return  # event separator or comment (keep-alive)
        name, _, value = line.partition(":")
        if name in ("event", "id", "retry"):
            return
        if name != "data":
            raise MalformedStreamError(f"not an SSE data line: {line[:80]!r}")
        if self.done:
            raise MalformedStreamError("data after [DONE]")
        payload = value.strip()
        if payload == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError:
            raise MalformedStreamError(f"chunk is not JSON: {payload[:80]!r}") from None
        if not isinstance(chunk, dict):
            raise MalformedStreamError(f"chunk is not a JSON object: {payload[:80]!r}")
        error = chunk.get("error")
        if error is not None:
            message = error.get("message") if isinstance(error, dict) else error
            raise MalformedStreamError(f"error chunk: {message}")
        self._chunk(chunk, now)

    def _chunk(self, chunk: dict[str, Any], now: float) -> None:
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            raise MalformedStreamError("chunk without a choices list")
        usage = chunk.get("usage")
        if usage is not None:
            if not isinstance(usage, dict) or not isinstance(usage.get("completion_tokens"), int):
                raise MalformedStreamError(f"malformed usage: {usage!r}")
            self.usage = usage
        if not choices and usage is None:
            raise MalformedStreamError("chunk with neither choices nor usage")
        for choice in choices:
            if not isinstance(choice, dict):
                raise MalformedStreamError("a choice is not a JSON object")
            text = self._content(choice)
            if text or choice.get("token_ids"):  # token ids: a server model without tokenizer
                self.content_times.append(now)
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]

    def _content(self, choice: dict[str, Any]) -> str | None:
        if self.endpoint == "completions":
            text = choice.get("text")
        else:
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                raise MalformedStreamError("chat chunk without a delta object")
            text = delta.get("content")
        if text is not None and not isinstance(text, str):
            raise MalformedStreamError(f"content is not a string: {text!r}")
        return text

    def check_complete(self) -> None:
        if not self.done:
            raise MalformedStreamError("stream ended without data: [DONE]")
        if not self.content_times:
            raise MalformedStreamError("stream carried no content")
        if self.finish_reason is None:
            raise MalformedStreamError("no choice finished (finish_reason never set)")


@dataclass(frozen=True)
class ServerTarget:
    """Where and how requests are sent. `base_url` is the server root (no /v1)."""

    base_url: str
    model: str
    endpoint: Endpoint = "completions"
    api_key: str | None = None
    temperature: float = 0.0

    @property
    def route(self) -> str:
        path = "/v1/completions" if self.endpoint == "completions" else "/v1/chat/completions"
        return self.base_url.rstrip("/") + path

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def payload(self, request: BenchRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "temperature": self.temperature,
            "ignore_eos": True,
            "return_token_ids": True,  # Strata's extension; other servers ignore it
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.endpoint == "completions":
            body.update(prompt=request.prompt, max_tokens=request.output_len)
        else:
            if not isinstance(request.prompt, str):
                raise BenchmarkError("the chat endpoint needs text prompts (--prompts text)")
            body.update(
                messages=[{"role": "user", "content": request.prompt}],
                max_completion_tokens=request.output_len,
            )
        return body


async def send_request(
    client: httpx.AsyncClient, target: ServerTarget, request: BenchRequest, run_start: float
) -> RequestRecord:
    """Send one streaming request and time it; never raises for a server or network fault."""
    record = RequestRecord(request.index, "failed", expected_output_tokens=request.output_len)
    state = StreamParser(target.endpoint)
    sent = time.perf_counter()
    record.sent_s = sent - run_start
    try:
        async with client.stream(
            "POST", target.route, json=target.payload(request), headers=target.headers()
        ) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                record.error = f"HTTP {response.status_code}: {_error_message(body)}"
                return record
            async for line in response.aiter_lines():
                state.feed(line, time.perf_counter())
        ended = time.perf_counter()
        state.check_complete()
    except MalformedStreamError as exc:
        record.error = str(exc)
        return record
    except httpx.TimeoutException as exc:
        record.outcome = "lost"
        record.error = f"no answer within the timeout ({type(exc).__name__})"
        return record
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}"
        return record
    _fill_timing(record, state, sent, ended, request)
    return record


def _fill_timing(
    record: RequestRecord, state: StreamParser, sent: float, ended: float, request: BenchRequest
) -> None:
    times = state.content_times
    record.outcome = "ok"
    record.ttft_ms = (times[0] - sent) * 1e3
    record.e2e_ms = (ended - sent) * 1e3
    record.itl_ms = [(b - a) * 1e3 for a, b in itertools.pairwise(times)]
    record.content_chunks = len(times)
    usage = state.usage
    record.usage_reported = usage is not None
    if usage is None:
        record.input_tokens, record.output_tokens = request.prompt_len, len(times)
        return
    record.output_tokens = usage["completion_tokens"]
    prompt_tokens = usage.get("prompt_tokens")
    record.input_tokens = prompt_tokens if isinstance(prompt_tokens, int) else request.prompt_len
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        record.cached_tokens = details["cached_tokens"]


def _error_message(body: str) -> str:
    try:
        error = json.loads(body).get("error")
    except (json.JSONDecodeError, AttributeError):
        return body[:200]
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return body[:200]


async def served_model(client: httpx.AsyncClient, base_url: str, api_key: str | None) -> str:
    """The first model the server lists at /v1/models."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/v1/models"
    try:
        response = await client.get(url, headers=headers)
    except httpx.HTTPError as exc:
        raise BenchmarkError(f"cannot reach {url}: {type(exc).__name__}: {exc}") from exc
    if response.status_code != 200:
        raise BenchmarkError(f"GET {url} answered {response.status_code}: {response.text[:200]}")
    try:
        return str(response.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise BenchmarkError(f"GET {url} listed no model: {response.text[:200]}") from None


def http_client(
    max_connections: int | None, timeout_s: float, verify: ssl.SSLContext | bool = True
) -> httpx.AsyncClient:
    """No pool wait limit: requests queue at the server, where latency is measured."""
    timeout = httpx.Timeout(timeout_s, pool=None)
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=None)
    return httpx.AsyncClient(timeout=timeout, limits=limits, verify=verify)


class ClientSet:
    """Single-connection HTTP clients, one per request in flight, reused as requests end.

    One httpx client holding N connections costs O(N) per request event (httpcore scans
    its pool): with hundreds of streams the load generator, not the server, sets the pace.
    The clients share one SSL context: building one per client costs about 20 ms each.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._ssl = ssl.create_default_context()
        self._free: list[httpx.AsyncClient] = []
        self._all: list[httpx.AsyncClient] = []

    def reserve(self, count: int) -> None:
        """Build clients until there are `count` (before a clock starts)."""
        while len(self._all) < count:
            self._free.append(self._new())

    def _new(self) -> httpx.AsyncClient:
        client = http_client(1, self.timeout_s, self._ssl)
        self._all.append(client)
        return client

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[httpx.AsyncClient]:
        """A client no other request is using, for the length of one request."""
        client = self._free.pop() if self._free else self._new()
        try:
            yield client
        finally:
            self._free.append(client)

    async def __aenter__(self) -> ClientSet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self._all:
            await client.aclose()
        self._all, self._free = [], []
