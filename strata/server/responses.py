"""Response and stream-chunk bodies in OpenAI's formats, built from engine outputs."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from strata.engine.outputs import RequestOutput, TokenLogprobs
from strata.server.tool_output import ToolCalls


class TokenText:
    """Token id -> its text as a single token, cached (logprobs name tokens by text)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            if self._tokenizer is None:
                text = f"<{token_id}>"
            else:
                text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def body(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


def usage_of(finals: list[RequestOutput], n: int) -> Usage:
    """Usage of a request whose choices are `finals`, `n` per prompt in prompt order.

    The prompt counts once per prompt, as OpenAI bills it; its cached tokens are the
    fewest any of its n copies found in the cache.
    """
    usage = Usage()
    for start in range(0, len(finals), n):
        group = finals[start : start + n]
        usage.prompt_tokens += len(group[0].prompt_token_ids)
        usage.cached_tokens += min(o.num_cached_tokens for o in group)
    usage.completion_tokens = sum(len(o.token_ids) for o in finals)
    return usage


def finish_reason(out: RequestOutput, called_tools: bool = False) -> str | None:
    """OpenAI's reason: "length", "tool_calls" (stopped after calling tools) or "stop"."""
    if not out.finished:
        return None
    if out.finish_reason == "length":
        return "length"
    return "tool_calls" if called_tools else "stop"


@dataclass
class _Formatter:
    """The envelope every body of one response shares: id, object, created, model."""

    request_id: str
    model: str
    token_text: TokenText
    created: int = field(default_factory=lambda: int(time.time()))

    RESPONSE_OBJECT: ClassVar[str]
    CHUNK_OBJECT: ClassVar[str]

    def _body(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def response(self, choices: list[dict[str, Any]], usage: Usage) -> dict[str, Any]:
        return {**self._body(self.RESPONSE_OBJECT, choices), "usage": usage.body()}

    def chunk_of(self, choice: dict[str, Any], include_usage: bool) -> dict[str, Any]:
        body = self._body(self.CHUNK_OBJECT, [choice])
        if include_usage:
            body["usage"] = None  # only the last chunk carries usage
        return body

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        return {**self._body(self.CHUNK_OBJECT, []), "usage": usage.body()}


@dataclass
class CompletionFormatter(_Formatter):
    """Bodies for /v1/completions."""

    RESPONSE_OBJECT: ClassVar[str] = "text_completion"
    CHUNK_OBJECT: ClassVar[str] = "text_completion"
    _text_offsets: dict[int, int] = field(default_factory=dict)

    def logprobs(
        self, index: int, entries: list[TokenLogprobs | None], with_top: bool, first: int = 0
    ) -> dict[str, Any]:
        """Entries in token order; None is an echoed first prompt token (id `first`),
        which has no log-probability."""
        offset = self._text_offsets.get(index, 0)
        tokens: list[str] = []
        token_lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for e in entries:
            text = self.token_text(first if e is None else e.token_id)
            tokens.append(text)
            token_lps.append(None if e is None else e.logprob)
            offsets.append(offset)
            offset += len(text)
            if e is None:
                tops.append(None)
            elif with_top:
                top: dict[str, float] = {}
                for token_id, lp in e.top:
                    key = self.token_text(token_id)
                    top[key] = max(lp, top.get(key, float("-inf")))
                tops.append(top)
        self._text_offsets[index] = offset
        return {
            "tokens": tokens,
            "token_logprobs": token_lps,
            "top_logprobs": tops if with_top else None,
            "text_offset": offsets,
        }

    def choice(
        self, index: int, text: str, out: RequestOutput,
        entries: list[TokenLogprobs | None] | None, num_top: int | None,
    ) -> dict[str, Any]:  # fmt: skip
        lp = None
        if entries is not None:
            first = out.prompt_token_ids[0] if out.prompt_token_ids else 0
            lp = self.logprobs(index, entries, bool(num_top), first)
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason(out)}

    def chunk(self, choice: dict[str, Any], include_usage: bool) -> dict[str, Any]:
        return self.chunk_of(choice, include_usage)


@dataclass
class ChatFormatter(_Formatter):
    """Bodies for /v1/chat/completions."""

    RESPONSE_OBJECT: ClassVar[str] = "chat.completion"
    CHUNK_OBJECT: ClassVar[str] = "chat.completion.chunk"

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def logprobs(self, entries: list[TokenLogprobs]) -> dict[str, Any]:
        content = []
        for e in entries:
            item = self._entry(e.token_id, e.logprob)
            item["top_logprobs"] = [self._entry(t, lp) for t, lp in e.top]
            content.append(item)
        return {"content": content}

    def choice(
        self, index: int, out: RequestOutput, entries: list[TokenLogprobs] | None,
        tools: ToolCalls | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        message, called = (tools or ToolCalls("none")).message(out.text)
        return {
            "index": index,
            "message": message,
            "logprobs": None if entries is None else self.logprobs(entries),
            "finish_reason": finish_reason(out, called),
        }

    def chunk(
        self,
        index: int,
        delta: dict[str, Any],
        out: RequestOutput | None,
        entries: list[TokenLogprobs] | None,
        include_usage: bool,
        called_tools: bool = False,
    ) -> dict[str, Any]:
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": None if entries is None else self.logprobs(entries),
            "finish_reason": None if out is None else finish_reason(out, called_tools),
        }
        return self.chunk_of(choice, include_usage)
