"""RequestGuard: the checks every HTTP request passes before any route reads its body.

In order, from the headers alone:
1. the API key, on every path but the open ones (/health, and /metrics with
   --public-metrics): 401 unless `Authorization: Bearer KEY` names a configured key; the
   key's tenant goes into the request's state (`request.state.tenant`);
2. the body size: 413 when Content-Length exceeds `max_body_bytes`, and 413 as soon as a
   body sent without a length (chunked) passes it, before it is read in full.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from strata.server.errors import APIError

ALWAYS_OPEN = frozenset({"/health"})


def tenant_of(key: str) -> str:
    """A tenant's name: a digest of its key, so that logs and cache keys never hold it."""
    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


class RequestGuard:
    def __init__(
        self,
        app: ASGIApp,
        keys: Mapping[str, str],
        max_body_bytes: int,
        open_paths: frozenset[str] = ALWAYS_OPEN,
    ) -> None:
        """keys: API key -> tenant (empty: no key needed); open_paths: no key needed."""
        self.app = app
        self.keys = dict(keys)
        self.max_body_bytes = max_body_bytes
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope["path"], headers)
        if refusal is not None:
            await refusal.response()(scope, receive, send)
            return
        if self.keys and scope["path"] not in self.open_paths:
            scope.setdefault("state", {})["tenant"] = self._tenant(headers)
        await self.app(scope, self._bounded(receive), send)

    def _refusal(self, path: str, headers: dict[str, str]) -> APIError | None:
        if self.keys and path not in self.open_paths and self._tenant(headers) is None:
            return APIError(
                401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )  # fmt: skip
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return _too_large(self.max_body_bytes)
        return None

    def _tenant(self, headers: dict[str, str]) -> str | None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        token = token.strip()
        found = None
        for key, tenant in self.keys.items():  # every key compared: no early exit to time
            if secrets.compare_digest(token.encode(), key.encode()):
                found = tenant
        return found

    def _bounded(self, receive: Receive) -> Receive:
        """`receive` that raises a 413 once the body read so far passes the limit."""
        seen = 0

        async def bounded() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise HTTPException(413, _too_large(self.max_body_bytes).message)
            return message

        return bounded


def _too_large(limit: int) -> APIError:
    return APIError(
        413, f"the request body is larger than {limit} bytes (--max-request-bytes)",
        code="request_too_large",
    )  # fmt: skip


def guard_options(
    api_keys: list[str], public_metrics: bool, max_body_bytes: int
) -> dict[str, Any]:
    """RequestGuard's keyword arguments for a server's configuration."""
    open_paths = ALWAYS_OPEN | ({"/metrics"} if public_metrics else set())
    return {
        "keys": {key: tenant_of(key) for key in api_keys},
        "max_body_bytes": max_body_bytes,
        "open_paths": frozenset(open_paths),
    }
