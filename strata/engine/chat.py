"""Render a conversation into prompt token ids with the model's chat template."""

from __future__ import annotations

from typing import Any

from strata.errors import InvalidRequestError

Message = dict[str, Any]


def chat_prompt_ids(
    tokenizer: Any, messages: list[Message], model_name: str, add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Token ids of `messages` rendered by the chat template (with the generation prompt
    that starts the assistant's turn unless add_generation_prompt is False). `tools`
    (OpenAI tool specs) go to the template, for those with a tool section.

    Raises InvalidRequestError for a model without a template, an empty conversation,
    a malformed message, or one the template itself rejects.
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError(f"model {model_name} has no chat template")
    if not messages:
        raise InvalidRequestError("a conversation needs at least one message")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InvalidRequestError(f"each message needs 'role' and 'content', got {m!r}")
    try:
        extra = {} if tools is None else {"tools": tools}
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False, **extra
        )
    except Exception as exc:  # jinja2 errors raised by the template (raise_exception, say)
        raise InvalidRequestError(f"the chat template rejected the messages: {exc}") from exc
    return list(tokenizer(text, add_special_tokens=False).input_ids)
