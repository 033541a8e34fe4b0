"""ToolCalls: a chat request's tool mode, applied to its output: the message's content and
tool_calls, and their stream deltas in OpenAI's format.

Streaming by mode:
    named      the call opens on the first delta; the arguments stream as generated
    required   each call of the JSON array opens once its name is complete, then its
               arguments stream (tool_array_stream.py)
    auto       content streams until the parser's start marker (a tail that could begin
               it is held back); from there the text is kept and parsed at the end
    none       content only
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from strata.server.tool_array_stream import ArrayCallStream
from strata.server.tool_parsers import ToolCall, ToolParser
from strata.server.tools import FunctionSpec


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_required(text: str) -> list[ToolCall]:
    """The grammar made `text` a JSON array of {name, arguments}; an array cut short by
    max_tokens gives the calls it completed."""
    decoder = json.JSONDecoder()
    calls, at = [], text.find("[") + 1
    while at > 0:
        while at < len(text) and text[at] in ", \n\t":
            at += 1
        try:
            item, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            break
        calls.append(ToolCall(item["name"], json.dumps(item["arguments"])))
    return calls


@dataclass(frozen=True)
class ToolCalls:
    mode: str  # "none", "auto", "required" or "named"
    named: FunctionSpec | None = None
    parser: ToolParser | None = None

    def split(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a whole output."""
        if self.mode == "named" and self.named is not None:
            return None, [ToolCall(self.named.name, text)]
        if self.mode == "required":
            calls = parse_required(text)
            return (None, calls) if calls else (text, [])
        if self.mode == "auto" and self.parser is not None:
            return self.parser.parse(text)
        return text, []

    def message(self, text: str) -> tuple[dict[str, Any], bool]:
        """The assistant message, and whether it calls tools."""
        content, calls = self.split(text)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [_call_body(c, _call_id()) for c in calls]
        return message, bool(calls)

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)


def _call_body(call: ToolCall, call_id: str) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


@dataclass
class ToolCallStream:
    """One choice's deltas: feed() each new piece of text, then end() once."""

    calls: ToolCalls
    text: str = ""  # everything generated
    sent: int = 0  # characters of `text` sent as content or arguments
    opened: bool = False  # a named call's first delta has gone out
    called: bool = field(default=False, init=False)  # a tool call has been sent
    array: ArrayCallStream = field(default_factory=ArrayCallStream)  # required's calls

    def feed(self, piece: str) -> list[dict[str, Any]]:
        self.text += piece
        mode, parser = self.calls.mode, self.calls.parser
        if mode == "named":
            return self._named(piece)
        if mode == "required":
            deltas = self.array.feed(self.text)
            self.called = self.array.opened
            return deltas
        if mode == "auto" and parser is not None:
            return self._content(parser.content_end(self.text))
        return self._content(len(self.text))

    def end(self) -> list[dict[str, Any]]:
        mode, parser = self.calls.mode, self.calls.parser
        if mode == "named" or (mode == "required" and self.array.opened):
            return []
        _, calls = self.calls.split(self.text)
        if not calls:
            return self._content(len(self.text))
        deltas = self._content(parser.content_end(self.text)) if parser is not None else []
        self.called = True
        bodies = [{"index": i, **_call_body(c, _call_id())} for i, c in enumerate(calls)]
        return [*deltas, {"tool_calls": bodies}]

    def _named(self, piece: str) -> list[dict[str, Any]]:
        assert self.calls.named is not None
        if not piece:
            return []
        self.called = True
        if not self.opened:
            self.opened = True
            function = {"name": self.calls.named.name, "arguments": piece}
            head = {"index": 0, "id": _call_id(), "type": "function", "function": function}
            return [{"tool_calls": [head]}]
        return [{"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}]

    def _content(self, end: int) -> list[dict[str, Any]]:
        if end <= self.sent:
            return []
        piece, self.sent = self.text[self.sent : end], end
        return [{"content": piece}]
