"""POST /tokenize and /detokenize, as vLLM names them: a prompt or a conversation (rendered
by the chat template, as /v1/chat/completions would) to token ids, and token ids to text.

    /tokenize    {"prompt": str, "add_special_tokens": true}
                 {"messages": [...], "add_generation_prompt": true}
                 -> {"count", "max_model_len", "tokens", "token_strs"}
    /detokenize  {"tokens": [int]} -> {"prompt": str}
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from strata.engine.chat import chat_prompt_ids
from strata.engine.detokenizer import decode_ids
from strata.engine.front import EngineFront
from strata.errors import InvalidRequestError
from strata.server.protocol import ChatMessage, ParameterError


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # a prompt's; messages get what the template writes
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


def _tokenizer(engine: EngineFront, model_name: str) -> Any:
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise InvalidRequestError(f"model {model_name} has no tokenizer")
    return tokenizer


def _tokenize(engine: EngineFront, model_name: str, body: TokenizeRequest) -> list[int]:
    tokenizer = _tokenizer(engine, model_name)
    if (body.prompt is None) == (body.messages is None):
        raise ParameterError("prompt", "send exactly one of prompt and messages")
    if body.prompt is not None:
        return list(tokenizer(body.prompt, add_special_tokens=body.add_special_tokens).input_ids)
    messages = [m.as_template_message() for m in body.messages or []]
    try:
        return chat_prompt_ids(
            tokenizer, messages, model_name, add_generation_prompt=body.add_generation_prompt
        )
    except InvalidRequestError as exc:
        raise ParameterError("messages", str(exc)) from exc


async def tokenize(engine: EngineFront, model_name: str, body: TokenizeRequest) -> dict[str, Any]:
    ids = await engine.run_in_tokenizer_thread(_tokenize, engine, model_name, body)
    strs = None
    if body.return_token_strs:
        strs = _tokenizer(engine, model_name).convert_ids_to_tokens(ids)
    return {
        "count": len(ids),
        "max_model_len": engine.max_model_len,
        "tokens": ids,
        "token_strs": strs,
    }


def _detokenize(engine: EngineFront, model_name: str, tokens: list[int]) -> str:
    tokenizer = _tokenizer(engine, model_name)
    vocab = engine.vocab_size
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise ParameterError("tokens", f"token ids must be in [0, {vocab}), got {bad[:5]}")
    return decode_ids(tokenizer, tokens, skip_special_tokens=False)


async def detokenize(
    engine: EngineFront, model_name: str, body: DetokenizeRequest
) -> dict[str, Any]:
    text = await engine.run_in_tokenizer_thread(_detokenize, engine, model_name, body.tokens)
    return {"prompt": text}
