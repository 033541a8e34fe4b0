"""The block keys of a request's prompt, as the replica that serves it will compute them.

The front tokenizes with the replicas' own tokenizer and chat template (fetched from a
replica), and salts the chain as the replica will (tenant, then cache_salt, through the
request's own SamplingParams), so `keys[i]` equals the key the replica's KVManager looks
up for block i. Only blocks `match_prefix` may reuse count: one token is always left
to compute. A request the front cannot parse has no keys; its replica answers the error.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from strata.engine.chat import chat_prompt_ids
from strata.kv.prefix import chain_key, salted_root
from strata.server.chat_prompt import template_messages
from strata.server.guard import tenant_of
from strata.server.protocol import ChatCompletionRequest, CompletionRequest


@dataclass(frozen=True)
class RoutedPrompt:
    """A request's prompt as its replica will see it: token ids, the salt of its chain,
    and the keys of the blocks it may reuse (`PromptKeys.chain`)."""

    token_ids: tuple[int, ...]
    cache_salt: str | None
    keys: tuple[bytes, ...]


NO_PROMPT = RoutedPrompt((), None, ())  # a request the front cannot parse, or no prompt


@dataclass(frozen=True)
class PromptKeys:
    tokenizer: Any | None
    model_name: str
    root: bytes  # the replicas' engine root key (prefix.root_key)
    block_size: int
    api_keys: tuple[str, ...] = ()  # with two or more, each key's tenant salts its chain
    allow_special_tokens: bool = False

    def keys(self, path: str, body: Mapping[str, Any], headers: Mapping[str, str]) -> list[bytes]:
        return list(self.prompt(path, body, headers).keys)

    def prompt(
        self, path: str, body: Mapping[str, Any], headers: Mapping[str, str]
    ) -> RoutedPrompt:
        try:
            ids, salt = self._prompt(path, body, self._tenant(headers))
        except (ValidationError, ValueError, TypeError, KeyError):
            return NO_PROMPT
        return RoutedPrompt(tuple(ids), salt, tuple(self.chain(ids, salt)))

    def chain(self, ids: list[int], salt: str | None) -> list[bytes]:
        bs = self.block_size
        parent = salted_root(self.root, salt)
        keys = []
        for i in range((len(ids) - 1) // bs):
            parent = chain_key(parent, ids[i * bs : (i + 1) * bs])
            keys.append(parent)
        return keys

    def _prompt(
        self, path: str, body: Mapping[str, Any], tenant: str | None
    ) -> tuple[list[int], str | None]:
        if path == "/v1/chat/completions":
            chat = ChatCompletionRequest.model_validate(body)
            mode, _ = chat.tool_mode()
            messages, tools = template_messages(chat, self.tokenizer, mode)
            ids = chat_prompt_ids(
                self.tokenizer, messages, self.model_name, self.allow_special_tokens, True, tools
            )  # fmt: skip
            return ids, chat.sampling_params(chat.max_new_tokens, None, tenant).cache_salt
        if path == "/v1/completions":
            completion = CompletionRequest.model_validate(body)
            prompt = completion.prompts()[0]
            salt = completion.sampling_params(completion.max_tokens, None, tenant).cache_salt
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    return [], salt
                return list(self.tokenizer(prompt).input_ids), salt
            return list(prompt), salt
        return [], None

    def _tenant(self, headers: Mapping[str, str]) -> str | None:
        """The request's tenant as the replica's RequestGuard finds it (guard.py)."""
        if len(self.api_keys) < 2:
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        found = None
        for key in self.api_keys:  # every key compared, as the guard does
            if secrets.compare_digest(token.strip().encode(), key.encode()):
                found = tenant_of(key)
        return found
