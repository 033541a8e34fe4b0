"""Tool-call parsers for `tool_choice: auto`: the model's text -> content and tool calls.

    hermes        <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks
                  (Qwen2/Qwen2.5 templates, and the prompt Strata writes for templates
                  without a tool section)
    llama3_json   {"name": ..., "parameters": {...}} objects, optionally after
                  <|python_tag|>, separated by ";" (Llama 3.1/3.2 templates)

The parser is chosen from the chat template, or by `--tool-call-parser`. Text that does
not parse as tool calls stays content. `start` is the text that opens a call: a stream
sends content until it appears and holds back a tail that could be its beginning.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from strata.registry import Registry


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it


def _call(obj: Any, argument_keys: tuple[str, ...]) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    for key in argument_keys:
        if key in obj:
            args = obj[key]
            return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args))
    return ToolCall(obj["name"], "{}")


class ToolParser:
    start = ""

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content or None, tool calls); no calls leaves the whole text as content."""
        raise NotImplementedError

    def content_end(self, text: str) -> int:
        """How much of `text` (an output so far) is content for sure: up to the start
        marker, less a tail that could be the marker's beginning."""
        at = text.find(self.start)
        if at >= 0:
            return at
        for keep in range(min(len(self.start) - 1, len(text)), 0, -1):
            if self.start.startswith(text[-keep:]):
                return len(text) - keep
        return len(text)


class HermesParser(ToolParser):
    start = "<tool_call>"
    _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        at = text.find(self.start)
        if at < 0:
            return text, []
        calls = []
        for body in self._BLOCK.findall(text[at:]):
            try:
                call = _call(json.loads(body), ("arguments", "parameters"))
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        content = text[:at].strip()
        return content or None, calls


class Llama3JsonParser(ToolParser):
    start = "<|python_tag|>"

    def content_end(self, text: str) -> int:
        """A call is the whole output: while the output could still become one, none of
        it is content."""
        head = text.lstrip()
        if not head or head.startswith("{") or head.startswith(self.start):
            return 0
        return 0 if self.start.startswith(head) else len(text)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = text.strip().removeprefix(self.start).lstrip()
        if not body.startswith("{"):
            return text, []
        decoder = json.JSONDecoder()
        calls, at = [], 0
        while at < len(body):
            try:
                obj, end = decoder.raw_decode(body, at)
            except json.JSONDecodeError:
                return text, []
            call = _call(obj, ("parameters", "arguments"))
            if call is None:
                return text, []
            calls.append(call)
            at = end
            while at < len(body) and body[at] in "; \n\t":
                at += 1
        return None, calls


TOOL_PARSERS: Registry[ToolParser] = Registry(
    "tool call parser", {"hermes": HermesParser(), "llama3_json": Llama3JsonParser()}
)


def parser_for(tokenizer: Any, name: str | None) -> ToolParser:
    """The named parser, else the one the chat template's tool format calls for."""
    if name is not None:
        return TOOL_PARSERS.get(name)
    template = str(getattr(tokenizer, "chat_template", "") or "")
    if "<tool_call>" not in template and ("<|python_tag|>" in template or "ipython" in template):
        return TOOL_PARSERS.get("llama3_json")
    return TOOL_PARSERS.get("hermes")
