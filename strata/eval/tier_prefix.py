"""`strata eval ruler --prefix-from tier`: samples whose prompts come back from the KV tiers.

    write through   every sample's prompt is prefilled once (one greedy token): its full
                    blocks go into the tiers, coded by --kv-tier-codec if one is set
    cold GPU        the GPU prefix cache is emptied; the blocks stay in the tiers
    scored run      each prompt finds its full blocks in the cpu tier and loads them
                    (decoded into the pool) instead of computing them

Scores and predictions against a `--prefix-from compute` run measure what the tier codec
costs. Needs a tier and the full policy (a policy must see the prefill it compresses).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from strata.engine.llm import LLM
from strata.engine.sampling_params import SamplingParams
from strata.eval.prompt import prompt_ids, template_parts
from strata.eval.sample import Sample
from strata.eval.settings import Setting

logger = logging.getLogger("strata.eval")


def check_tier_prefix(llm: LLM, runs: Sequence[Setting]) -> None:
    if llm.engine.tiers is None:
        raise ValueError("--prefix-from tier needs a KV tier: set --kv-cpu-memory")
    if any(not s.is_full for s in runs):
        raise ValueError("--prefix-from tier runs the full policy only (--policy full)")


def write_prompts_through(llm: LLM, samples: Sequence[Sample]) -> None:
    """Prefill every sample's prompt into the tiers, then empty the GPU prefix cache."""
    tokenizer = llm.engine.tokenizer
    parts = template_parts(tokenizer)
    prompts = [prompt_ids(tokenizer, s, parts).all for s in samples]
    llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    tiers = llm.engine.tiers
    assert tiers is not None  # check_tier_prefix
    tiers.flush()
    evicted = llm.engine.kv.evict_all_cached()
    logger.info("wrote %d prompts through the tiers; %d GPU blocks evicted", len(prompts),
                evicted)  # fmt: skip
