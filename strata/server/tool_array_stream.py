"""ArrayCallStream: a `tool_choice: required` output streamed call by call.

The grammar fixes the output's shape, separators included (no free whitespace):

    [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": ...}]
     |<------- head: opens call i ------->|<-- arguments -->|

A call opens (id, name, empty arguments) once its head is complete; its arguments then
stream as generated, and end where their outermost bracket closes (strings and escapes
are tracked, so brackets inside strings do not count).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

_HEAD = re.compile(r'\{"name": ("(?:[^"\\]|\\.)*"), "arguments": ')


@dataclass
class ArrayCallStream:
    pos: int = 0  # characters of the text consumed
    index: int = -1  # the call being streamed
    in_arguments: bool = False
    depth: int = 0  # open brackets in the current arguments
    in_string: bool = False
    escaped: bool = False

    def feed(self, text: str) -> list[dict[str, Any]]:
        """Deltas for what `text` (the whole output so far) adds."""
        deltas: list[dict[str, Any]] = []
        while self.pos < len(text):
            if not self.in_arguments:
                head = _HEAD.search(text, self.pos)
                if head is None:
                    break
                self.index += 1
                self.pos, self.in_arguments, self.depth = head.end(), True, 0
                deltas.append({"tool_calls": [self._open(json.loads(head.group(1)))]})
                continue
            end = self._arguments_end(text)
            piece = text[self.pos : end]
            self.pos = end
            if piece:
                arguments = {"index": self.index, "function": {"arguments": piece}}
                deltas.append({"tool_calls": [arguments]})
        return deltas

    def _open(self, name: str) -> dict[str, Any]:
        return {
            "index": self.index,
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }

    @property
    def opened(self) -> bool:
        return self.index >= 0

    def _arguments_end(self, text: str) -> int:
        """Where the current arguments end in `text` (len(text) if not yet); scanning
        past self.pos updates the bracket state."""
        for at in range(self.pos, len(text)):
            char = text[at]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
            if self.depth == 0 and not self.in_string:
                self.in_arguments = False
                return at + 1
        return len(text)
