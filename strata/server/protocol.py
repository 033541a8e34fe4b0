"""Request bodies of the OpenAI-compatible API, as pydantic models.

Unknown fields are ignored, as OpenAI does. Fields OpenAI defines but Strata cannot
honour (penalties, logit_bias, tools, JSON modes, best_of, suffix) are rejected with a
400 when set to anything but their no-op value, rather than silently ignored.
Strata's own extensions: top_k, ignore_eos, stop_token_ids, skip_special_tokens,
return_token_ids (each choice and stream chunk also carries the generated token ids,
which is how a model without a tokenizer, a random: one say, can be served and timed),
and session_id with cache_ttl_s (the turn's KV stays pinned for the session's next turn),
kv_policy, kv_budget and kv_compress_prefix (the request's KV eviction policy; see
SamplingParams), and cache_salt (the request reuses only cached KV of the same salt).

Every text must be encodable as UTF-8 (no lone surrogates), integer fields and token ids
take JSON integers only (true/false are not integers), and one request asks for at most
MAX_CHOICES sequences (prompts x n).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt

from strata.engine.sampling_params import SamplingParams
from strata.errors import InvalidRequestError

MAX_N = 16
MAX_LOGPROBS = SamplingParams.MAX_LOGPROBS
MAX_CHOICES = 256  # prompts x n of one request
MAX_SESSION_ID = 200  # SamplingParams allows 256: room for the tenant's prefix


def _utf8(text: str) -> str:
    """Reject a string that UTF-8 cannot encode (a lone surrogate, from a JSON escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        message = f"the text holds an invalid character at {exc.start}: {exc.reason}"
        raise ValueError(message) from None
    return text


# Text from a client: any string UTF-8 can encode.
Text = Annotated[str, AfterValidator(_utf8)]
TokenIds = list[StrictInt]  # true/false are not token ids


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    seed: StrictInt | None = None
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: Text | None = None
    # Strata extensions
    top_k: StrictInt = Field(-1, ge=-1)
    ignore_eos: bool = False
    stop_token_ids: TokenIds | None = None
    skip_special_tokens: bool = True
    return_token_ids: bool = False
    session_id: Text | None = Field(None, min_length=1, max_length=MAX_SESSION_ID)
    cache_ttl_s: float | None = None
    kv_policy: Text | None = None
    kv_budget: float | None = None
    kv_compress_prefix: StrictInt | None = None
    cache_salt: Text | None = Field(None, min_length=1, max_length=1024)

    def check_supported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0.0):
                raise ParameterError(name, f"{name} is not supported; omit it or send 0")
        if self.logit_bias:
            raise ParameterError("logit_bias", "logit_bias is not supported")
        if self.stream_options is not None and not self.stream:
            raise ParameterError(
                "stream_options", "stream_options is only allowed when stream is true"
            )

    def sampling_params(
        self, max_tokens: int | None, logprobs: int | None, tenant: str | None = None
    ) -> SamplingParams:
        """SamplingParams for this body; raises InvalidRequestError on a bad combination.
        The tenant, when several share the server, partitions the cache before cache_salt."""
        salt, session = self.cache_salt, self.session_id
        if tenant is not None:  # tenants share neither cached prefixes nor session pins
            salt = f"tenant:{tenant}" + ("" if salt is None else f"/{salt}")
            session = None if session is None else f"tenant:{tenant}/{session}"
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=tuple(s for s in stop if s),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            session_id=session,
            cache_ttl_s=self.cache_ttl_s,
            kv_policy=self.kv_policy,
            kv_budget=self.kv_budget,
            kv_compress_prefix=self.kv_compress_prefix,
            cache_salt=salt,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingRequest):
    prompt: Text | list[Text] | TokenIds | list[TokenIds]
    max_tokens: StrictInt | None = Field(16, ge=1)
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: StrictInt | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise ParameterError("suffix", "suffix (insertion) is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ParameterError("best_of", "best_of is not supported; use n")
        if self.echo and self.logprobs is not None:
            raise ParameterError(
                "echo", "echo with logprobs is not supported (prompt logprobs are not computed)"
            )

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one choice group each."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ParameterError("prompt", "prompt is an empty list")
        if all(isinstance(t, int) for t in p):
            return [list(p)]  # type: ignore[arg-type]
        if len(p) * self.n > MAX_CHOICES:
            raise ParameterError(
                "prompt", f"prompts x n must be at most {MAX_CHOICES}, got {len(p)} x {self.n}"
            )
        return list(p)  # type: ignore[arg-type]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def as_template_message(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise ParameterError(
                        "messages", f"content parts of type {part.type!r} are not supported"
                    )
                texts.append(part.text)
            content = "".join(texts)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = "text"


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    response_format: ResponseFormat | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise ParameterError("tools", "tool calling is not supported")
        if self.response_format is not None and self.response_format.type != "text":
            raise ParameterError(
                "response_format", f"response_format {self.response_format.type!r} is not supported"
            )
        if self.top_logprobs is not None and not self.logprobs:
            raise ParameterError("top_logprobs", "top_logprobs requires logprobs to be true")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class ParameterError(InvalidRequestError):
    """A bad or unsupported value of the parameter `param`."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message, param)
