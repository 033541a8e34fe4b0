"""The front's HTTP app: every route of app.py, relayed to the replica the router picks;
/health and /metrics (routing decisions by reason, then every replica's own metrics
labelled by replica: metrics_merge.py) answer here. Disaggregated, a routed request is
first prefilled by the prefill pool (prefill.py).

The prompt is tokenized for routing on one thread of the front, off the event loop.
The front checks the API key and body size (guard.py) as a lone server does; the replica
checks them again, and everything else (parameters, lengths).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import generate_latest

from strata.server.errors import install_error_handlers
from strata.server.guard import RequestGuard, guard_options
from strata.server.replicas.front import Front
from strata.server.replicas.metrics_merge import render as render_replica_metrics
from strata.server.replicas.prefill import PrefillStage
from strata.server.replicas.prompt_keys import NO_PROMPT, RoutedPrompt
from strata.server.replicas.relay import relay

ROUTED_PATHS = ("/v1/completions", "/v1/chat/completions")


def build_front_app(front: Front, prefill: PrefillStage | None = None) -> FastAPI:
    tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="strata-route-tokenize")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await front.start()
        if prefill is not None:
            await prefill.start()
        yield
        if prefill is not None:
            await prefill.stop()
        await front.stop()
        tokenize_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="Strata (replicas)", lifespan=lifespan)
    app.state.front = front
    install_error_handlers(app)
    config = front.config  # the same key and size checks as a lone server's, at the door
    guard = guard_options(config.api_keys, config.public_metrics, config.max_request_bytes)
    app.add_middleware(RequestGuard, **guard)

    @app.get("/health")
    async def health() -> JSONResponse:
        up = [f"replica-{i}" for i, ok in enumerate(front.up) if ok]
        if prefill is not None:  # without one, the decode replicas compute the prompts
            up += [f"prefill-{i}" for i, ok in enumerate(prefill.pool.up) if ok]
        routed = any(front.up)
        return JSONResponse({"status": "ok" if routed else "no replica up", "replicas": up},
                            status_code=200 if routed else 503)  # fmt: skip

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await _metrics_text(front, prefill), media_type="text/plain")

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(request: Request) -> Response:
        body = await request.body()  # RequestGuard bounds its size
        path = request.url.path
        headers = dict(request.headers)
        prompt = NO_PROMPT
        if path in ROUTED_PATHS and front.prompt_keys is not None:
            loop = asyncio.get_running_loop()
            prompt = await loop.run_in_executor(
                tokenize_pool, _prompt, front, path, body, headers
            )  # fmt: skip
            if prefill is not None:
                await prefill.run(prompt, front)
        call = {
            "method": request.method, "path": path, "query": request.url.query.encode(),
            "headers": list(headers.items()), "body": body,
        }  # fmt: skip
        return await relay(front, call, list(prompt.keys))

    return app


async def _metrics_text(front: Front, prefill: PrefillStage | None) -> bytes:
    """The routers' metrics, then every replica's own families, once each."""
    text = generate_latest(front.metrics.registry)
    pools = [front]
    if prefill is not None:
        text += generate_latest(prefill.metrics.registry)
        pools.append(prefill.pool)
    texts: dict[str, str | None] = {}
    for named in await asyncio.gather(*(pool.replica_metrics() for pool in pools)):
        texts.update(named)
    return text + render_replica_metrics(texts)


def _prompt(front: Front, path: str, body: bytes, headers: dict[str, str]) -> RoutedPrompt:
    assert front.prompt_keys is not None
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        return NO_PROMPT
    if not isinstance(parsed, dict):
        return NO_PROMPT
    return front.prompt_keys.prompt(path, parsed, headers)
