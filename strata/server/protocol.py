"""Request bodies of the OpenAI-compatible API, as pydantic models.

Unknown fields are ignored, as OpenAI does. Fields OpenAI defines but Strata cannot
honour (best_of, suffix) are rejected with a 400 when set to anything but their no-op
value, rather than silently ignored. vLLM's extensions: repetition_penalty, min_tokens,
min_p and bad_words (see SamplingParams). Strata's own extensions: top_k, ignore_eos,
stop_token_ids, skip_special_tokens, return_token_ids (each choice and stream chunk
also carries the generated token ids, which is how a model without a tokenizer, a
random: one say, can be served and timed),
and session_id with cache_ttl_s (the turn's KV stays pinned for the session's next turn),
kv_policy, kv_budget and kv_compress_prefix (the request's KV eviction policy; see
SamplingParams), and cache_salt (the request reuses only cached KV of the same salt).

Every text must be encodable as UTF-8 (no lone surrogates), integer fields and token ids
take JSON integers only (true/false are not integers), and one request asks for at most
MAX_CHOICES sequences (prompts x n).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt

from strata.engine.sampling_params import SamplingParams
from strata.engine.structured_output import StructuredOutput
from strata.errors import InvalidRequestError
from strata.server.structured import GuidedFields, ResponseFormat
from strata.server.tools import (
    FunctionSpec,
    ToolChoice,
    ToolSpec,
    hermes_call_text,
    resolve_choice,
    tool_grammar,
)

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


class _SamplingRequest(GuidedFields):
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
    # vLLM extensions
    repetition_penalty: float = 1.0
    min_tokens: StrictInt = 0
    min_p: float = 0.0
    bad_words: list[Text] | None = None
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
        if self.stream_options is not None and not self.stream:
            raise ParameterError(
                "stream_options", "stream_options is only allowed when stream is true"
            )

    def sampling_params(
        self,
        max_tokens: int | None,
        logprobs: int | None,
        tenant: str | None = None,
        prompt_logprobs: int | None = None,
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
            prompt_logprobs=prompt_logprobs,
            structured_output=self.structured()[1],
            skip_special_tokens=self.skip_special_tokens,
            session_id=session,
            cache_ttl_s=self.cache_ttl_s,
            kv_policy=self.kv_policy,
            kv_budget=self.kv_budget,
            kv_compress_prefix=self.kv_compress_prefix,
            cache_salt=salt,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty,
            logit_bias=self._logit_bias(),
            min_tokens=self.min_tokens,
            min_p=self.min_p,
            bad_words=tuple(self.bad_words or ()),
        )

    def structured(self) -> tuple[str | None, StructuredOutput | None]:
        """The field that asks for structured output, and the spec; (None, None) if none."""
        return self.guided_output()

    def _logit_bias(self) -> dict[int, float] | None:
        """JSON object keys are strings; logit_bias's must spell token ids."""
        if not self.logit_bias:
            return None
        bad = [k for k in self.logit_bias if not k.isdigit()]
        if bad:
            raise ParameterError(
                "logit_bias", f"logit_bias keys must be token ids (integers >= 0), got {bad[0]!r}"
            )
        return {int(k): v for k, v in self.logit_bias.items()}

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingRequest):
    prompt: Text | list[Text] | TokenIds | list[TokenIds]
    max_tokens: StrictInt | None = Field(16, ge=0)  # 0 with echo: score the prompt only
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    response_format: ResponseFormat | None = None
    suffix: str | None = None
    best_of: StrictInt | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise ParameterError("suffix", "suffix (insertion) is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ParameterError("best_of", "best_of is not supported; use n")
        if self.max_tokens == 0 and not self.echo:
            raise ParameterError(
                "max_tokens", "max_tokens must be >= 1 (0 only with echo, to score the prompt)"
            )

    def structured(self) -> tuple[str | None, StructuredOutput | None]:
        return self.guided_output(self.response_format)

    @property
    def prompt_logprobs(self) -> int | None:
        """With echo, logprobs cover the prompt too; max_tokens 0 needs them computed."""
        if not self.echo:
            return None
        return 0 if self.logprobs is None and self.max_tokens == 0 else self.logprobs

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


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str = "{}"  # JSON text


class MessageToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction

    def template_call(self) -> dict[str, Any]:
        """As chat templates take it: the arguments as an object."""
        try:
            arguments = json.loads(self.function.arguments)
        except json.JSONDecodeError as exc:
            raise ParameterError(
                "messages", f"tool call arguments must be JSON text: {exc}"
            ) from exc
        function = {"name": self.function.name, "arguments": arguments}
        return {"id": self.id, "type": "function", "function": function}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: Text | None = None

    def as_template_message(self, template_has_tools: bool = False) -> dict[str, Any]:
        """The message as the chat template takes it. Tool calls go in `tool_calls` for a
        template with a tool section, else into the text in the Hermes format."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role}
        message["content"] = self._text()
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            calls = [c.template_call() for c in self.tool_calls]
            if template_has_tools:
                message["tool_calls"] = calls
            else:
                texts = [hermes_call_text(c["function"]["name"], c["function"]["arguments"])
                         for c in calls]  # fmt: skip
                message["content"] = "\n".join(filter(None, [message["content"], *texts]))
        return message

    def _text(self) -> str:
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
        return content or ""


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise ParameterError("top_logprobs", "top_logprobs requires logprobs to be true")

    def tool_mode(self) -> tuple[str, FunctionSpec | None]:
        """("none" | "auto" | "required" | "named", the named function)."""
        return resolve_choice(self.tools, self.tool_choice)

    def structured(self) -> tuple[str | None, StructuredOutput | None]:
        """response_format or a guided field, or the grammar that enforces tool_choice."""
        field, spec = self.guided_output(self.response_format)
        mode, named = self.tool_mode()
        tools_spec = tool_grammar(mode, self.tools or [], named, self.parallel_tool_calls)
        if tools_spec is None:
            return field, spec
        if spec is not None:
            raise ParameterError(
                "tool_choice", f"tool_choice {mode!r} cannot be combined with {field}"
            )
        return "tool_choice", tools_spec

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
