"""The OpenAI-compatible HTTP app: /v1/completions, /v1/chat/completions, /v1/models,
/tokenize and /detokenize (tokenize.py), /health and /metrics, over one EngineFront.

Every request first passes the RequestGuard (guard.py): the API key, then the body size,
from the headers alone.

A request is checked whole before anything is queued: parameters, model name, every
prompt's length against the context, and the waiting queue's room for all its choices.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from strata.engine.front import EngineFront, EngineStoppedError, QueueFullError
from strata.engine.grammar_compiler import GrammarCompileError
from strata.engine.outputs import RequestOutput
from strata.engine.sampling_params import SamplingParams
from strata.engine.sequence import Sequence as EngineSequence
from strata.errors import InvalidRequestError
from strata.server.chat_prompt import chat_prompt
from strata.server.config import DEFAULT_MAX_REQUEST_BYTES
from strata.server.errors import (
    APIError,
    install_error_handlers,
    invalid_request,
    server_error,
    unavailable,
)
from strata.server.front_header import FrontHeader
from strata.server.guard import RequestGuard, guard_options
from strata.server.metrics import ServerMetrics
from strata.server.protocol import ChatCompletionRequest, CompletionRequest
from strata.server.request_run import ClientDisconnected, RequestRun
from strata.server.responses import (
    ChatFormatter,
    CompletionFormatter,
    TokenText,
    usage_of,
)
from strata.server.stream_chunks import chat_chunks, completion_chunks, echo_logprobs
from strata.server.tokenize import DetokenizeRequest, TokenizeRequest, detokenize, tokenize

logger = logging.getLogger("strata.server")

QUEUE_FULL_RETRY_AFTER_S = 1


@dataclass
class ServerState:
    """What the routes share. `engine` is None until the model has loaded."""

    model_name: str
    api_keys: tuple[str, ...] = ()  # each a tenant; none: no key needed
    public_metrics: bool = False
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    allow_special_tokens_in_content: bool = False
    tool_call_parser: str | None = None  # None: chosen from the chat template
    front: int | None = None  # one of several HTTP front processes: its index
    engine: EngineFront | None = None
    load_error: str | None = None
    started: float = field(default_factory=time.time)
    metrics: ServerMetrics = field(init=False)
    token_text: TokenText | None = None

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(self._stats, self.front)

    def _stats(self) -> dict[str, Any] | None:
        return None if self.engine is None else self.engine.stats_snapshot

    @property
    def draining(self) -> bool:
        """Shutting down: the engine refuses new requests while those in flight finish."""
        return self.engine is not None and self.engine.stopping

    def set_engine(self, engine: EngineFront) -> None:
        self.token_text = TokenText(engine.tokenizer)
        self.engine = engine

    def ready_engine(self) -> EngineFront:
        if self.engine is not None and not self.engine.alive:
            raise unavailable("the engine stopped after a fault; see the server log")
        if self.draining:
            raise unavailable("the server is shutting down")
        if self.engine is None:
            raise unavailable(self.load_error or "the model is still loading")
        return self.engine

    def tenant_of(self, request: Request) -> str | None:
        """The tenant whose cache partition the request uses: its key's (guard.py), when
        several keys are configured; None (one shared cache) otherwise."""
        if len(self.api_keys) < 2:
            return None
        return str(request.state.tenant)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model", code="model_not_found",
            )  # fmt: skip


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="Strata", version="0.1.0", description="OpenAI-compatible LLM server")
    app.state.strata = state
    install_error_handlers(app)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; RequestRun logged one INFO line

    guard = guard_options(list(state.api_keys), state.public_metrics, state.max_request_bytes)
    app.add_middleware(RequestGuard, **guard)
    if state.front is not None:  # outermost: refusals carry it too
        app.add_middleware(FrontHeader, front=state.front)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.engine is None or state.draining or not state.engine.alive:
            status = state.load_error or "loading"
            if state.engine is not None:
                status = "draining" if state.engine.alive else "engine stopped after a fault"
            return JSONResponse({"status": status}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": state.model_name, "object": "model", "created": int(state.started),
            "owned_by": "strata",
        }  # fmt: skip
        if state.engine is not None:
            card["max_model_len"] = state.engine.max_model_len
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _complete(state, body, request)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _chat(state, body, request)

    @app.post("/tokenize")
    async def tokenize_route(body: TokenizeRequest) -> dict[str, Any]:
        engine = state.ready_engine()
        state.check_model(body.model)
        return await tokenize(engine, state.model_name, body)

    @app.post("/detokenize")
    async def detokenize_route(body: DetokenizeRequest) -> dict[str, Any]:
        engine = state.ready_engine()
        state.check_model(body.model)
        return await detokenize(engine, state.model_name, body)

    return app


async def _complete(state: ServerState, body: CompletionRequest, request: Request) -> Response:
    arrival = time.perf_counter()  # latency metrics count the wait for tokenization
    engine = state.ready_engine()
    state.check_model(body.model)
    body.check_supported()
    prompts = body.prompts()
    tenant = state.tenant_of(request)
    params = body.sampling_params(body.max_tokens, body.logprobs, tenant, body.prompt_logprobs)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    seqs = await _prepare(engine, prompts, params, body, request_id, "prompt")
    run = _submit(state, engine, request_id, seqs, arrival)
    assert state.token_text is not None
    fmt = CompletionFormatter(request_id, state.model_name, state.token_text)
    echo = None
    if body.echo:  # decoding token-id prompts is tokenizer work: off the event loop
        echo = await engine.run_in_tokenizer_thread(_prompt_texts, engine, seqs)
    if body.stream:
        return _stream(completion_chunks(run, fmt, body, echo), run)
    finals = await _collect(run, request)
    choices = []
    for i, out in enumerate(finals):
        text = (echo[i] if echo else "") + out.text
        choice = fmt.choice(i, text, out, echo_logprobs(out, out.logprobs, body), body.logprobs)
        if body.return_token_ids:
            choice["token_ids"] = out.token_ids
        choices.append(choice)
    return JSONResponse(fmt.response(choices, usage_of(finals, body.n)))


async def _chat(state: ServerState, body: ChatCompletionRequest, request: Request) -> Response:
    arrival = time.perf_counter()  # latency metrics count the wait for tokenization
    engine = state.ready_engine()
    state.check_model(body.model)
    body.check_supported()
    prompt_ids, tools = await chat_prompt(
        engine, body, state.model_name, state.tool_call_parser,
        state.allow_special_tokens_in_content,
    )  # fmt: skip
    params = body.sampling_params(body.max_new_tokens, body.num_logprobs, state.tenant_of(request))
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    seqs = await _prepare(engine, [prompt_ids], params, body, request_id, "messages")
    run = _submit(state, engine, request_id, seqs, arrival)
    assert state.token_text is not None
    fmt = ChatFormatter(request_id, state.model_name, state.token_text)
    if body.stream:
        return _stream(chat_chunks(run, fmt, body, tools), run)
    finals = await _collect(run, request)
    choices = [fmt.choice(i, out, out.logprobs, tools) for i, out in enumerate(finals)]
    if body.return_token_ids:
        for choice, out in zip(choices, finals, strict=True):
            choice["token_ids"] = out.token_ids
    return JSONResponse(fmt.response(choices, usage_of(finals, body.n)))


# ---- request flow ---------------------------------------------------------------------------


def _choice_params(params: SamplingParams, k: int) -> SamplingParams:
    """The k-th of n choices: a seeded request's choices differ by seed, reproducibly."""
    if k == 0 or params.seed is None:
        return params
    return replace(params, seed=(params.seed + k) % (SamplingParams.MAX_SEED + 1))


async def _prepare(
    engine: EngineFront,
    prompts: list[Any],
    params: SamplingParams,
    body: CompletionRequest | ChatCompletionRequest,
    request_id: str,
    param_name: str,
) -> list[EngineSequence]:
    seqs = []
    n = body.n
    try:
        for p, prompt in enumerate(prompts):
            first = await engine.prepare(prompt, params, f"{request_id}-{p * n}")
            seqs.append(first)
            for k in range(1, n):
                copy_params = _choice_params(params, k)
                copy_id = f"{request_id}-{p * n + k}"
                seqs.append(await engine.prepare(first.prompt_token_ids, copy_params, copy_id))
    except GrammarCompileError as exc:
        raise APIError(400, str(exc), param=body.structured()[0]) from exc
    except InvalidRequestError as exc:
        raise invalid_request(exc, param_name) from exc
    return seqs


def _submit(
    state: ServerState,
    engine: EngineFront,
    request_id: str,
    seqs: list[EngineSequence],
    arrival: float,
) -> RequestRun:
    try:
        streams = engine.submit(seqs)
    except QueueFullError as exc:
        state.metrics.rejected.labels(status="429").inc()
        raise APIError(
            429, str(exc), type_="rate_limit_error", code="queue_full",
            headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)},
        ) from exc  # fmt: skip
    except EngineStoppedError as exc:
        state.metrics.rejected.labels(status="503").inc()
        raise unavailable(str(exc)) from exc
    return RequestRun(request_id, streams, state.metrics, arrival)


async def _collect(run: RequestRun, request: Request) -> list[RequestOutput]:
    try:
        finals = await run.collect(request)
    except ClientDisconnected:
        run.close("client disconnected")
        raise
    except BaseException:
        run.close("cancelled")
        raise
    errors = [out.error for out in finals if out.error is not None]
    run.close("error" if errors else "ok")
    if errors:
        raise server_error(errors[0])
    return finals


def _prompt_texts(engine: EngineFront, seqs: list[EngineSequence]) -> list[str]:
    return [_prompt_text(engine, s) for s in seqs]


def _prompt_text(engine: EngineFront, seq: EngineSequence) -> str:
    if seq.prompt is not None:
        return seq.prompt
    tokenizer = engine.tokenizer
    return "" if tokenizer is None else tokenizer.decode(seq.prompt_token_ids)


def _stream(chunks: AsyncIterator[str], run: RequestRun) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        status = "client disconnected"
        try:
            async for chunk in chunks:
                yield chunk
            status = "ok"
        finally:
            run.close(status)

    return StreamingResponse(body(), media_type="text/event-stream")
