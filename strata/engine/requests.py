"""RequestFactory: a request's prompt and parameters, checked, become a Sequence.

Nothing is queued here, and a bad request raises InvalidRequestError (or its subclass
ContextLengthError) with the limit it broke, before anything is allocated.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence as Seq
from typing import Any

from strata.engine.detokenizer import Detokenizer
from strata.engine.grammar_compiler import GrammarCompiler
from strata.engine.logit_rules import logit_rules
from strata.engine.prompt_encoder import PromptEncoder
from strata.engine.sampling_params import SamplingParams
from strata.engine.sequence import Sequence
from strata.errors import ContextLengthError, InvalidRequestError
from strata.kv.policies.runtime.driver import KVPolicyDriver


class RequestFactory(PromptEncoder):
    def __init__(
        self,
        tokenizer: Any | None,
        model_name: str,
        vocab_size: int,
        max_model_len: int,
        kv_policies: KVPolicyDriver,
        seed: int,
        eos_token_ids: frozenset[int] = frozenset(),
    ) -> None:
        super().__init__(tokenizer, model_name, vocab_size, max_model_len)
        self.kv_policies = kv_policies  # attaches each sequence's KV policy, if any
        self._ids = itertools.count()
        self._rng = random.Random(seed)  # seeds of unseeded requests
        self.eos_token_ids = eos_token_ids  # banned before min_tokens
        self.grammars = GrammarCompiler(tokenizer, vocab_size, eos_token_ids)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Check a request against the context; returns its resolved max_tokens."""
        n, limit = len(prompt_ids), self.max_model_len
        if n == 0:
            raise InvalidRequestError(
                "the prompt is empty; it must contain at least one token", "prompt"
            )
        bad = self._bad_token_ids(params.stop_token_ids)
        if bad:
            raise InvalidRequestError(
                f"stop_token_ids must be in [0, {self.vocab_size}); got {bad[:5]}",
                "stop_token_ids",
            )
        if n >= limit:
            raise ContextLengthError(
                f"the prompt has {n} tokens but the context holds {limit} (max_model_len), "
                "including at least one generated token"
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - n
        if n + max_tokens > limit:
            raise ContextLengthError(
                f"prompt ({n} tokens) + max_tokens ({max_tokens}) = {n + max_tokens} exceeds the "
                f"context length {limit} (max_model_len); lower max_tokens to at most {limit - n}"
            )
        return max_tokens

    def prepare(
        self,
        prompt: str | Seq[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        stream: bool = False,
    ) -> Sequence:
        """Tokenize and check a request without queueing it."""
        params = params or SamplingParams()
        text, ids = self.encode_prompt(prompt)
        return self.build(text, ids, params, request_id, stream)

    def build(
        self, text: str | None, ids: list[int], params: SamplingParams,
        request_id: str | None = None, stream: bool = False, seed: int | None = None,
    ) -> Sequence:  # fmt: skip
        """The Sequence of an encoded prompt (encode_prompt's text and ids), checked.
        `seed` is an unseeded request's drawn seed (None: draw one now)."""
        max_tokens = self.validate(ids, params)
        rules = logit_rules(params, self.tokenizer, self.vocab_size, self.eos_token_ids)
        so = params.structured_output
        grammar = None if so is None else self.grammars.matcher(so)  # waits for the compile
        request_id = request_id if request_id is not None else str(next(self._ids))
        detokenizer = None
        if self.tokenizer is not None and (stream or params.stop):
            detokenizer = Detokenizer(
                self.tokenizer, params.skip_special_tokens, params.stop, params.min_tokens
            )
        if params.seed is not None:
            seed = params.seed
        elif seed is None:
            seed = self._rng.getrandbits(32)
        seq = Sequence(
            request_id=request_id,
            prompt=text,
            prompt_token_ids=ids,
            params=params,
            seed=seed & 0xFFFFFFFF,
            max_tokens=max_tokens,
            detokenizer=detokenizer,
            logit_rules=rules,
            grammar=grammar,
        )
        self.kv_policies.attach(seq)
        return seq
