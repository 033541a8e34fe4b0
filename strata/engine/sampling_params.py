"""SamplingParams: how one request's tokens are chosen and when it stops."""

from __future__ import annotations

from dataclasses import dataclass

from strata.engine.structured_output import StructuredOutput
from strata.errors import InvalidRequestError
from strata.kv.policies.budget import check_budget
from strata.kv.policies.registry import check_policy_name


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling and stopping.

    temperature: 0 is greedy. top_p in (0, 1]; top_k of -1 or 0 disables it.
    seed: in [0, 2^32); makes this request's samples reproducible whatever else runs
    beside it.
    max_tokens: tokens to generate; None fills the context; 0 (with prompt_logprobs)
    only scores the prompt.
    stop: strings that end generation; they are not included in the text.
    stop_token_ids: token ids that end generation (included in token_ids).
    ignore_eos: keep generating past end-of-sequence tokens.
    logprobs: return the log-probabilities of the N most likely tokens at each step,
    beside the chosen token's (None: none; 0: only the chosen token's).
    prompt_logprobs: the same for every prompt token after the first (each prompt token's
    log-probability given the ones before it, and the N most likely there). The prompt is
    then computed in full, not read from the prefix cache.
    structured_output: a grammar the output follows (a JSON schema, any JSON object, a
    regex, a choice of strings or an EBNF grammar; see StructuredOutput). It is compiled
    when the request is prepared; a spec that does not compile raises InvalidRequestError.
    session_id / cache_ttl_s: a multi-turn session this request is a turn of; when the
    turn ends its KV stays pinned for cache_ttl_s seconds (default DEFAULT_SESSION_TTL_S)
    so the next turn reuses it even under memory pressure.
    kv_policy: the KV eviction policy for this request (strata/kv/policies/registry.py);
    None takes the engine's default (`LLM(kv_policy=...)`, itself "full": lossless).
    kv_budget: the KV the policy keeps, as a fraction of the compressed context if < 1 or
    a number of tokens if >= 1; None takes the engine's default.
    cache_salt: a partition of the prefix cache (GPU and tiers): the request reuses only
    blocks computed under the same salt (the server adds the tenant to it).
    kv_compress_prefix: compress only the first N prompt tokens, as a context, before the
    rest of the prompt (the question) is computed; the rest then attends to the
    compressed context uncompressed (query-agnostic: compress once, ask many). None
    compresses the whole prompt once it is computed (query-aware).

    Penalties and biases change the logits before temperature, in this order (vLLM's):
    repetition_penalty (in [0.01, 100]; 1 = off) divides positive logits and multiplies negative
    ones of every token in the prompt or the output; frequency_penalty (in [-2, 2])
    subtracts itself times a token's count in the output; presence_penalty (in [-2, 2])
    subtracts itself from every token the output holds. logit_bias adds {token id: bias
    in [-100, 100]}. min_tokens: end-of-sequence and stop tokens are banned, and stop
    strings ignored, until the output has this many tokens. bad_words: words never
    generated (each word's last token is banned after its other tokens, with and without
    a leading space). min_p (in [0, 1]): after temperature, drop tokens whose
    probability is below min_p times the most likely token's.
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    session_id: str | None = None
    cache_ttl_s: float | None = None
    kv_policy: str | None = None
    kv_budget: float | None = None
    kv_compress_prefix: int | None = None
    cache_salt: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    min_p: float = 0.0
    bad_words: tuple[str, ...] = ()
    prompt_logprobs: int | None = None
    structured_output: StructuredOutput | None = None

    MAX_LOGPROBS = 20
    DEFAULT_SESSION_TTL_S = 300.0
    MAX_SESSION_TTL_S = 86400.0
    MAX_TOP_K = 2**31 - 1  # beyond the vocabulary top_k keeps every token
    MAX_SEED = 2**32 - 1  # the sampler's noise takes a 32-bit seed
    MAX_STOP_STRINGS = 64
    MAX_STOP_CHARS = 1024  # per stop string
    MAX_STOP_TOKEN_IDS = 1024

    def __post_init__(self) -> None:
        # Accept a single string or any sequence for stop / stop_token_ids; store tuples.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        n = self.max_tokens
        scores_only = n == 0 and self.prompt_logprobs is not None
        if n is not None and not _is_int(n, 1) and not scores_only:
            raise InvalidRequestError(
                f"max_tokens must be an integer >= 1 (0 only with prompt_logprobs), got {n}",
                "max_tokens",
            )
        if not _is_number(self.temperature) or not 0 <= self.temperature < float("inf"):
            raise InvalidRequestError(
                f"temperature must be a finite number >= 0, got {self.temperature}", "temperature"
            )
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:  # also rejects NaN
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if not _is_int(self.top_k, -1, self.MAX_TOP_K):
            raise InvalidRequestError(
                f"top_k must be -1 (disabled) or an integer in [0, {self.MAX_TOP_K}], "
                f"got {self.top_k}", "top_k",
            )  # fmt: skip
        if self.seed is not None and not _is_int(self.seed, 0, self.MAX_SEED):
            raise InvalidRequestError(
                f"seed must be an integer in [0, {self.MAX_SEED}], got {self.seed!r}", "seed"
            )
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and not _is_int(n, 0, self.MAX_LOGPROBS):
                message = f"{name} must be in [0, {self.MAX_LOGPROBS}], got {n}"
                raise InvalidRequestError(message, name)
        self._check_stops()
        self._check_session()
        self._check_kv_policy()
        self._check_logit_rules()
        so = self.structured_output
        if so is not None and not isinstance(so, StructuredOutput):
            raise InvalidRequestError(
                f"structured_output must be a StructuredOutput, got {so!r}", "structured_output"
            )

    def _check_stops(self) -> None:
        stop, ids = self.stop, self.stop_token_ids
        if len(stop) > self.MAX_STOP_STRINGS:
            raise InvalidRequestError(
                f"at most {self.MAX_STOP_STRINGS} stop strings, got {len(stop)}", "stop"
            )
        if any(not isinstance(s, str) or not 0 < len(s) <= self.MAX_STOP_CHARS for s in stop):
            raise InvalidRequestError(
                f"stop strings must be non-empty strings of at most {self.MAX_STOP_CHARS} "
                f"characters, got {[s[:40] if isinstance(s, str) else s for s in stop[:5]]!r}",
                "stop",
            )  # fmt: skip
        if len(ids) > self.MAX_STOP_TOKEN_IDS or not all(_is_int(t, 0) for t in ids):
            raise InvalidRequestError(
                f"stop_token_ids must be at most {self.MAX_STOP_TOKEN_IDS} non-negative "
                f"integers, got {ids[:5]!r}{' ...' if len(ids) > 5 else ''}", "stop_token_ids",
            )  # fmt: skip

    def _check_session(self) -> None:
        if self.cache_salt is not None and (
            not isinstance(self.cache_salt, str) or not 0 < len(self.cache_salt) <= 1024
        ):
            raise InvalidRequestError(
                f"cache_salt must be a string of 1 to 1024 characters, got {self.cache_salt!r}",
                "cache_salt",
            )
        if self.session_id is not None and (
            not isinstance(self.session_id, str) or not 0 < len(self.session_id) <= 256
        ):
            raise InvalidRequestError(
                f"session_id must be a string of 1 to 256 characters, got {self.session_id!r}",
                "session_id",
            )
        if self.cache_ttl_s is not None:
            if self.session_id is None:
                raise InvalidRequestError(
                    "cache_ttl_s needs a session_id to pin the cache for", "cache_ttl_s"
                )
            if not 0 < self.cache_ttl_s <= self.MAX_SESSION_TTL_S:  # also rejects NaN
                raise InvalidRequestError(
                    f"cache_ttl_s must be in (0, {self.MAX_SESSION_TTL_S:g}] seconds, "
                    f"got {self.cache_ttl_s}", "cache_ttl_s",
                )  # fmt: skip
        elif self.session_id is not None:
            object.__setattr__(self, "cache_ttl_s", self.DEFAULT_SESSION_TTL_S)

    def _check_kv_policy(self) -> None:
        try:
            if self.kv_policy is not None:
                check_policy_name(self.kv_policy)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), "kv_policy") from None
        try:
            if self.kv_budget is not None:
                check_budget(self.kv_budget)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), "kv_budget") from None
        n = self.kv_compress_prefix
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise InvalidRequestError(
                f"kv_compress_prefix must be a number of prompt tokens >= 1, got {n!r}",
                "kv_compress_prefix",
            )

    def _check_logit_rules(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not -2.0 <= value <= 2.0:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {value!r}", name)
        r = self.repetition_penalty
        if not isinstance(r, (int, float)) or not 0.01 <= r <= 100.0:  # float32-safe
            raise InvalidRequestError(
                f"repetition_penalty must be in [0.01, 100] (1 = off), got {r!r}",
                "repetition_penalty",
            )
        if not isinstance(self.min_p, (int, float)) or not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p!r}", "min_p")
        n = self.min_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidRequestError(
                f"min_tokens must be an integer >= 0, got {n!r}", "min_tokens"
            )
        if self.max_tokens is not None and n > self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens ({n}) must not exceed max_tokens ({self.max_tokens})", "min_tokens"
            )
        words = (self.bad_words,) if isinstance(self.bad_words, str) else tuple(self.bad_words)
        if any(not isinstance(w, str) or not w.strip() for w in words):
            raise InvalidRequestError(
                f"bad_words must be non-empty strings, got {words!r}", "bad_words"
            )
        object.__setattr__(self, "bad_words", words)
        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", _checked_bias(self.logit_bias))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(value: object, low: int, high: int | None = None) -> bool:
    """An int (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return low <= value and (high is None or value <= high)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _checked_bias(bias: object) -> dict[int, float]:
    """logit_bias as {token id: bias}; keys may be integer strings, as JSON sends them."""
    if not isinstance(bias, dict):
        raise InvalidRequestError(
            f"logit_bias must map token ids to biases, got {bias!r}", "logit_bias"
        )
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            token = -1
        if isinstance(key, bool) or token < 0:
            raise InvalidRequestError(
                f"logit_bias keys must be token ids (integers >= 0), got {key!r}", "logit_bias"
            )
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not -100 <= value <= 100
        ):
            raise InvalidRequestError(
                f"logit_bias values must be in [-100, 100], got {value!r} for token {key}",
                "logit_bias",
            )
        out[token] = float(value)
    return out
