"""Tool calling: the request's tools, how they reach the prompt, and the grammar that
enforces `tool_choice`.

    tool_choice   prompt                        output                      parsed by
    none          tools rendered                text                        -
    auto          tools rendered                text and/or tool calls      the template's
                                                                            parser (tool_parsers.py)
    required      tools rendered                JSON array of {name,        json (grammar)
                                                arguments}, >= 1 call
    {function}    tools rendered                that function's arguments   json (grammar)

Tools are rendered by the model's chat template (apply_chat_template(tools=...)). A
template without a tool section (the embedded model's) gets them described in a system
message instead, with the Hermes <tool_call> format to answer in, and earlier turns'
tool calls written into the assistant's text in that format.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from strata.engine.structured_output import StructuredOutput
from strata.errors import InvalidRequestError


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def resolve_choice(
    tools: list[ToolSpec] | None, choice: ToolChoice | None
) -> tuple[str, FunctionSpec | None]:
    """("none" | "auto" | "required" | "named", the named function). Raises
    InvalidRequestError for a choice that names no tool of the request."""
    if not tools:
        if choice not in (None, "none"):
            raise InvalidRequestError("tool_choice needs tools", "tool_choice")
        return "none", None
    if choice is None:
        return "auto", None
    if isinstance(choice, str):
        return choice, None
    by_name = {t.function.name: t.function for t in tools}
    function = by_name.get(choice.function.name)
    if function is None:
        raise InvalidRequestError(
            f"tool_choice names {choice.function.name!r}, which is not among the tools "
            f"({', '.join(by_name)})",
            "tool_choice",
        )
    return "named", function


def tool_grammar(
    mode: str, tools: list[ToolSpec], named: FunctionSpec | None, parallel: bool
) -> StructuredOutput | None:
    """The grammar that enforces `required` or a named function; None otherwise."""
    if mode == "named" and named is not None:
        return StructuredOutput.json_schema(named.parameters)
    if mode != "required":
        return None
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t.function.name},
                "arguments": t.function.parameters,
            },
            "required": ["name", "arguments"],
        }
        for t in tools
    ]
    array: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        array["maxItems"] = 1
    return StructuredOutput.json_schema(array)


def template_supports_tools(tokenizer: Any) -> bool:
    return "tools" in str(getattr(tokenizer, "chat_template", "") or "")


def tools_system_prompt(tools: list[ToolSpec]) -> str:
    """What a template without a tool section is told about the tools."""
    listed = "\n".join(json.dumps(t.model_dump(exclude_none=True)) for t in tools)
    return (
        "You can call functions. The available functions, as JSON schemas:\n"
        f"<tools>\n{listed}\n</tools>\n"
        "To call a function, answer with one <tool_call></tool_call> block per call, "
        'each holding {"name": <function name>, "arguments": <arguments object>} as JSON.'
    )


def hermes_call_text(name: str, arguments: Any) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'
