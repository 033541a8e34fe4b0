"""Perplexity of Shakespeare under a KV policy, measured through the engine.

Each text is `length` tokens from the start of one work (works drawn with the seed).
The first `context` tokens are the prompt: prefilled and compressed at its end by the
policy (budget relative to them). The remaining tokens are teacher-forced one decode
step at a time (teacher_forcing.py), so a policy that also evicts while decoding keeps
the cache at its size throughout. Perplexity = exp(mean negative log-likelihood) over
every forced token of every text.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any

from strata.engine.llm import LLM
from strata.engine.sampling_params import SamplingParams
from strata.eval.corpus import shakespeare_works
from strata.eval.settings import Setting
from strata.eval.teacher_forcing import teacher_forcing
from strata.kv.policies.registry import FULL


@dataclass(frozen=True)
class PerplexityResult:
    setting: Setting
    length: int
    context: int
    num_texts: int
    perplexity: float
    wall_s: float
    works: tuple[str, ...]


def shakespeare_texts(
    tokenizer: Any, length: int, num_texts: int, seed: int
) -> list[tuple[str, list[int]]]:
    """(work, first `length` token ids) of `num_texts` works at least that long."""
    works = list(shakespeare_works())
    random.Random(seed).shuffle(works)
    texts = []
    for name, text in works:
        ids = list(tokenizer(text, add_special_tokens=False).input_ids)
        if len(ids) >= length:
            texts.append((name, ids[:length]))
        if len(texts) == num_texts:
            return texts
    raise ValueError(f"only {len(texts)} works have {length} tokens; ask for fewer texts")


def measure_perplexity(
    llm: LLM, setting: Setting, length: int, context: int, num_texts: int = 1, seed: int = 0
) -> PerplexityResult:
    if not 0 < context < length:
        raise ValueError(f"the context ({context}) must be shorter than the length ({length})")
    engine = llm.engine
    texts = shakespeare_texts(engine.tokenizer, length, num_texts, seed)
    forced = length - context
    start = time.perf_counter()
    with teacher_forcing(engine, [ids[context:] for _, ids in texts]):
        params = [
            SamplingParams(
                max_tokens=forced,
                temperature=0.0,
                seed=i,
                ignore_eos=True,
                logprobs=0,
                kv_policy=FULL if setting.is_full else setting.policy,
                kv_budget=None if setting.is_full else setting.budget,
            )
            for i in range(len(texts))
        ]
        outs = llm.generate([ids[:context] for _, ids in texts], params)
    wall = time.perf_counter() - start
    nll = [-lp.logprob for out in outs for lp in out.logprobs or []]
    if len(nll) != forced * len(texts):
        raise RuntimeError(f"expected {forced * len(texts)} forced tokens, got {len(nll)}")
    return PerplexityResult(
        setting, length, context, len(texts), math.exp(sum(nll) / len(nll)), wall,
        tuple(name for name, _ in texts),
    )  # fmt: skip
