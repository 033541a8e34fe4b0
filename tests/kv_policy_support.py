"""What the KV policy tests share: a tiny random GQA Llama, its engine, and helpers that
run a request to its compression point and read back the positions it kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig

from strata import LLM, SamplingParams
from strata.engine.sequence import Sequence
from tests.conftest import TINY, make_hf_model

LAYERS, HEADS, KV_HEADS = 3, 4, 2
GROUP = HEADS // KV_HEADS
BLOCK = 4
PROMPT = [3 + (i * 37) % 500 for i in range(120)]  # C = 120 tokens, no repeats nearby
C = len(PROMPT)
GREEDY = {"temperature": 0.0, "ignore_eos": True}


def tiny_policy_model(tmp_path_factory: pytest.TempPathFactory, name: str) -> tuple[Path, Any]:
    """(folder, transformers model with eager attention) of the tiny GQA Llama."""
    config = LlamaConfig(**{**TINY, "num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS})
    model = make_hf_model(config, seed=3)
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    model.set_attn_implementation("eager")
    return folder, model


def policy_llm(folder: Path) -> LLM:
    """160 blocks of BLOCK tokens; the papers' one-per-step eviction, for exact checks."""
    return LLM(str(folder), device="cpu", num_kv_blocks=160, block_size=BLOCK, kv_evict_interval=1)


def params(policy: str, budget: float, **kw: Any) -> SamplingParams:
    return SamplingParams(kv_policy=policy, kv_budget=budget, **{"max_tokens": 8, **GREEDY, **kw})


def compress(llm: LLM, params: SamplingParams, prompt: list[int] = PROMPT) -> Sequence:
    """Run a request until its policy compressed the prompt; the caller aborts it."""
    engine = llm.engine
    seq = engine._seqs[engine.add_request(prompt, params)]
    assert seq.kv is not None
    while not seq.kv.compressed:
        engine.step()
    return seq


def kept(seq: Sequence, layer: int) -> list[set[int]]:
    assert seq.kv is not None
    return [set(row.tolist()) for row in seq.kv.positions(layer)]


def top(scores: torch.Tensor, k: int) -> set[int]:
    """Positions of the k highest scores, ties to the lower position (as the policies)."""
    return set(torch.sort(scores, descending=True, stable=True).indices[:k].tolist())
