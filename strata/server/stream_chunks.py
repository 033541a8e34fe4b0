"""The SSE chunks of streamed /v1/completions and /v1/chat/completions responses, from a
RequestRun's outputs: text (with echo, the prompt first), logprobs, tool-call deltas
(tool_output.py), and a final usage chunk when asked for."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from strata.engine.outputs import RequestOutput, TokenLogprobs
from strata.server.errors import server_error
from strata.server.protocol import ChatCompletionRequest, CompletionRequest
from strata.server.request_run import RequestRun
from strata.server.responses import SSE_DONE, ChatFormatter, CompletionFormatter, sse, usage_of
from strata.server.tool_output import ToolCalls


def _error_chunk(message: str) -> str:
    return sse(server_error(message).body())


def _delta_logprobs(out: RequestOutput) -> list[Any] | None:
    if out.logprobs is None:
        return None
    n = len(out.delta_token_ids)
    return out.logprobs[len(out.logprobs) - n :] if n else []


def echo_logprobs(
    out: RequestOutput, entries: list[Any] | None, body: CompletionRequest
) -> list[TokenLogprobs | None] | None:
    """With echo and logprobs, the prompt's entries go first; its first token has none."""
    if entries is None or not body.echo or out.prompt_logprobs is None:
        return entries
    return [None, *out.prompt_logprobs, *entries]


async def completion_chunks(
    run: RequestRun, fmt: CompletionFormatter, body: CompletionRequest, echo: list[str] | None
) -> AsyncIterator[str]:
    echoed: set[int] = set()
    async for index, out in run.outputs():
        if out.error is not None:
            yield _error_chunk(out.error)
            break
        text = out.delta_text
        entries = _delta_logprobs(out)
        if echo is not None and index not in echoed:
            echoed.add(index)
            text = echo[index] + text
            entries = echo_logprobs(out, entries, body)
        if not text and not out.finished and not out.delta_token_ids:
            continue
        choice = fmt.choice(index, text, out, entries, body.logprobs)
        if body.return_token_ids:
            choice["token_ids"] = out.delta_token_ids
        yield sse(fmt.chunk(choice, body.include_usage))
    else:
        if body.include_usage:
            finals = [o for o in run.finals if o is not None]
            yield sse(fmt.usage_chunk(usage_of(finals, body.n)))
    yield SSE_DONE


async def chat_chunks(
    run: RequestRun, fmt: ChatFormatter, body: ChatCompletionRequest, tools: ToolCalls
) -> AsyncIterator[str]:
    usage = body.include_usage
    streams = [tools.stream() for _ in run.streams]
    for index in range(len(run.streams)):
        yield sse(fmt.chunk(index, {"role": "assistant", "content": ""}, None, None, usage))
    async for index, out in run.outputs():
        if out.error is not None:
            yield _error_chunk(out.error)
            break
        if out.delta_text or out.delta_token_ids:
            deltas = streams[index].feed(out.delta_text)
            entries = _delta_logprobs(out)
            if not deltas and (tools.mode == "none" or entries or body.return_token_ids):
                deltas = [{"content": ""}]  # carries the tokens' logprobs and ids
            for k, delta in enumerate(deltas):
                chunk = fmt.chunk(index, delta, None, None if k else entries, usage)
                if body.return_token_ids and not k:
                    chunk["choices"][0]["token_ids"] = out.delta_token_ids
                yield sse(chunk)
        if out.finished:
            for delta in streams[index].end():
                yield sse(fmt.chunk(index, delta, None, None, usage))
            yield sse(fmt.chunk(index, {}, out, None, usage, streams[index].called))
    else:
        if usage:
            finals = [o for o in run.finals if o is not None]
            yield sse(fmt.usage_chunk(usage_of(finals, body.n)))
    yield SSE_DONE
