"""Render a conversation into prompt token ids with the model's chat template."""

from __future__ import annotations

import secrets
from typing import Any

from strata.errors import InvalidRequestError

Message = dict[str, Any]


def chat_prompt_ids(
    tokenizer: Any, messages: list[Message], model_name: str, allow_special_tokens: bool = False,
    add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Token ids of `messages` rendered by the chat template (with the generation prompt
    that starts the assistant's turn unless add_generation_prompt is False). `tools`
    (OpenAI tool specs) go to the template, for those with a tool section.

    Only the template produces special tokens: text inside message contents is tokenized
    as text, so a user's "<|im_start|>system" is never a control token. The template is
    rendered once more with an unguessable marker in place of each content, which tells
    exactly where contents lie; the pieces must join back into the real rendering, or
    the request is refused. allow_special_tokens tokenizes the rendered text whole,
    letting contents produce control tokens too.

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
    text = _render(tokenizer, messages, add_generation_prompt, tools)
    if allow_special_tokens:
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    nonce = secrets.token_hex(8)
    texts = [i for i, m in enumerate(messages) if isinstance(m["content"], str) and m["content"]]
    marked = list(messages)  # contents that are text get a marker; others (None) stay
    for j, i in enumerate(texts):
        marked[i] = {**messages[i], "content": f"\ue000{nonce}:{j}\ue000"}
    template = _render(tokenizer, marked, add_generation_prompt, tools)
    contents = [str(messages[i]["content"]) for i in texts]
    for form in (contents, [c.strip() for c in contents]):  # as given, or trimmed
        parts = _split(template, nonce, form)
        if parts is not None and "".join(parts) == text:
            return _tokenize_parts(tokenizer, parts)
    raise InvalidRequestError(
        "the chat template changes message contents, so they cannot be kept apart from its "
        "control tokens; serve with --allow-special-tokens-in-content", "messages",
    )  # fmt: skip


def _render(
    tokenizer: Any, messages: list[Message], add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None,
) -> str:  # fmt: skip
    try:
        extra = {} if tools is None else {"tools": tools}
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False, **extra
        )
    except Exception as exc:  # jinja2 errors raised by the template (raise_exception, say)
        raise InvalidRequestError(f"the chat template rejected the messages: {exc}") from exc
    return str(text)


def _split(template: str, nonce: str, contents: list[str]) -> list[str] | None:
    """The conversation as [template, content 0, template, content 1, ..., template],
    from the template rendered with a marker in place of each content; None if a marker
    is missing (the template changed it)."""
    parts: list[str] = []
    rest = template
    for i, content in enumerate(contents):
        head, found, rest = rest.partition(f"\ue000{nonce}:{i}\ue000")
        if not found:
            return None
        parts += [head, content]
    return [*parts, rest]


def _tokenize_parts(tokenizer: Any, parts: list[str]) -> list[int]:
    """Template parts (even) with their special tokens; contents (odd) as plain text, any
    special-token string in them split into ordinary tokens."""
    ids: list[int] = []
    for i, part in enumerate(parts):
        if part:
            plain = i % 2 == 1
            ids += tokenizer(part, add_special_tokens=False, split_special_tokens=plain).input_ids
    return ids
