"""A chat request's prompt: its messages (and tools) rendered by the chat template, and
how its output is split into content and tool calls (tool_output.py)."""

from __future__ import annotations

from typing import Any

from strata.engine.chat import chat_prompt_ids
from strata.engine.front import EngineFront
from strata.errors import InvalidRequestError
from strata.server.errors import invalid_request
from strata.server.protocol import ChatCompletionRequest
from strata.server.tool_output import ToolCalls
from strata.server.tool_parsers import parser_for
from strata.server.tools import template_supports_tools, tools_system_prompt


def template_messages(
    body: ChatCompletionRequest, tokenizer: Any, mode: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools for the template). Without a tool section in the template, the
    tools are described in the system message instead (unless tool_choice is none)."""
    native = template_supports_tools(tokenizer)
    messages = [m.as_template_message(native) for m in body.messages]
    if not body.tools or mode == "none":
        return messages, None
    if native:
        return messages, [t.model_dump(exclude_none=True) for t in body.tools]
    described = tools_system_prompt(body.tools)
    if messages[0]["role"] == "system":
        messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{described}"}
    else:
        messages.insert(0, {"role": "system", "content": described})
    return messages, None


async def chat_prompt(
    engine: EngineFront, body: ChatCompletionRequest, model_name: str, parser: str | None,
    allow_special_tokens: bool = False,
) -> tuple[list[int], ToolCalls]:
    """The prompt's token ids, and the request's tool calling; InvalidRequestError -> 400.
    allow_special_tokens: message contents may produce control tokens (chat.py)."""
    mode, named = body.tool_mode()
    tokenizer = engine.tokenizer
    messages, tools = template_messages(body, tokenizer, mode)
    try:
        chars = sum(len(str(m.get("content") or "")) for m in messages)
        engine.check_text_length(chars, "messages")  # before templating
        ids = await engine.run_in_tokenizer_thread(
            chat_prompt_ids, tokenizer, messages, model_name, allow_special_tokens, True, tools
        )
    except InvalidRequestError as exc:
        raise invalid_request(exc, "messages") from exc
    auto_parser = parser_for(tokenizer, parser) if mode == "auto" else None
    return ids, ToolCalls(mode, named, auto_parser)
