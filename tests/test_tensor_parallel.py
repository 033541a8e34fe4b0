"""Tensor parallelism on CPU (gloo, 2 ranks): a TP=2 engine gives the greedy tokens of a
TP=1 engine exactly, and logits within 1e-4 (fp32), for dense and MoE models, with KV
heads split and replicated, under continuous batching with chunked prefill, preemption
and prefix-cache hits; from HF folders and from random weights."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, PretrainedConfig, Qwen2Config

from strata import LLM, SamplingParams
from strata.engine.tp import channel
from strata.server.metrics import ServerMetrics
from tests.conftest import TINY, assert_no_leaks, make_hf_model
from tests.test_hf_equality import _record_logits
from tests.test_moe_models import MOE_CONFIGS

TP_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    # 2 KV heads: one per rank.
    "llama-gqa": lambda: LlamaConfig(**{**TINY, "num_key_value_heads": 2}),
    # 1 KV head replicated on both ranks; tied embeddings; 509 rows: the last rank pads.
    "llama-mqa-tied": lambda: LlamaConfig(
        **{**TINY, "num_key_value_heads": 1, "tie_word_embeddings": True, "vocab_size": 509}
    ),
    "qwen2": lambda: Qwen2Config(**{**TINY, "num_key_value_heads": 2}),
    "mixtral": MOE_CONFIGS["mixtral"],
    "olmoe": MOE_CONFIGS["olmoe"],  # q/k norms over the whole (sharded) projections
    "qwen2_moe": MOE_CONFIGS["qwen2_moe"],  # shared expert, a dense layer
}

# A pool of 14 blocks of 4 tokens cannot hold all three at once: the last admitted is
# preempted and recomputed; 8-token chunks split the long prompt's prefill.
ENGINE = {
    "device": "cpu", "block_size": 4, "num_kv_blocks": 14, "max_num_batched_tokens": 8,
    "max_model_len": 48,
}
PROMPTS = [[5, 17, 300, 42, 7, 99, 250, 3, 11], [400, 8], list(range(30, 67))]
SHARED = list(range(100, 120))  # five full blocks, then two prompts that extend them
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tp_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, make in TP_CONFIGS.items():
        folder = tmp_path_factory.mktemp(name)
        make_hf_model(make()).save_pretrained(folder)
        out[name] = folder
    return out


def run_workload(llm: LLM) -> tuple[list[list[int]], list[torch.Tensor], dict[str, Any]]:
    """Tokens of a batch that preempts, then of two prompts sharing a cached prefix; every
    step's logits; the stats after."""
    logits = _record_logits(llm)
    tokens = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    for tail in ([1, 2, 3], [4, 5]):
        tokens += [o.token_ids for o in llm.generate([SHARED + tail], GREEDY)]
    return tokens, logits, llm.stats()


def assert_same_run(model: str, **options: Any) -> dict[str, Any]:
    """TP=2 equals TP=1 on run_workload; returns the TP=2 stats."""
    ref = LLM(model, **ENGINE, **options)
    want_tokens, want_logits, want_stats = run_workload(ref)
    with LLM(model, **ENGINE, **options, tensor_parallel_size=2) as tp:
        tokens, logits, stats = run_workload(tp)
        assert_no_leaks(tp)
    assert tokens == want_tokens
    assert len(logits) == len(want_logits)
    for got, want in zip(logits, want_logits, strict=True):
        assert got.shape == want.shape
        assert (got - want).abs().max().item() < 1e-4
    for key in ("num_preemptions", "prefix_cache_hit_tokens", "num_generated_tokens"):
        assert stats[key] == want_stats[key], key
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hit_tokens"] >= len(SHARED)
    return stats


@pytest.mark.parametrize("name", list(TP_CONFIGS))
def test_tp2_equals_tp1(
    name: str, tp_folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    if name == "qwen2":  # every step by doorbell and broadcast instead of inline on the pipe
        monkeypatch.setattr(channel, "INLINE_BYTES", 0)
    stats = assert_same_run(str(tp_folders[name]))
    assert stats["tensor_parallel_size"] == 2
    # Per step: the embedding, and per layer o_proj and the MLP or MoE block (OLMoE's
    # q/k norms add two per layer).
    layers = TP_CONFIGS[name]().num_hidden_layers
    per_step = 1 + layers * (4 if name == "olmoe" else 2)
    assert stats["tp_allreduces"] == per_step * stats["tp_steps"]
    assert stats["tp_allreduce_seconds"] > 0
    metrics = ServerMetrics(lambda: stats).render().decode().splitlines()
    assert "strata_tensor_parallel_size 2.0" in metrics
    assert f"strata_tp_steps_total {float(stats['tp_steps'])}" in metrics


@pytest.mark.parametrize("name", ["mixtral"])
def test_random_weights_tp2_equal_tp1(name: str, tmp_path: Path) -> None:
    """random:CONFIG draws the whole model's weights, then each rank keeps its share."""
    TP_CONFIGS[name]().save_pretrained(tmp_path)
    assert_same_run(f"random:{tmp_path / 'config.json'}", seed=3)


def test_lossy_kv_cache_dtype_tp2_equals_tp1(tp_folders: dict[str, Path]) -> None:
    """Codec scales are per KV head, so each rank codes its own heads as TP=1 would. Two
    tail rows, six sequences: a finished sequence's row is collected while the other
    running one keeps its own, on the workers as on rank 0 (its open blocks)."""
    options = {**ENGINE, "num_kv_blocks": 40, "kv_cache_dtype": "int4", "max_num_seqs": 2}
    prompts = [[(13 * i + 7 * j) % 500 for i in range(6 + j)] for j in range(6)]
    model = str(tp_folders["llama-gqa"])
    want = [o.token_ids for o in LLM(model, **options).generate(prompts, GREEDY)]
    with LLM(model, **options, tensor_parallel_size=2) as tp:
        assert [o.token_ids for o in tp.generate(prompts, GREEDY)] == want
        assert_no_leaks(tp)


def test_generate_command_with_two_ranks(tiny_chat_folder: Path) -> None:
    """`strata generate --tensor-parallel-size 2` prints TP=1's greedy text; a size that
    does not divide the heads is a usage error (exit 2) before any process starts."""
    args = ["--model", str(tiny_chat_folder), "--device", "cpu", "--no-chat-template",
            "--max-tokens", "12", "--temperature", "0", "--ignore-eos", "--kv-cache-memory",
            "0.05", "--max-model-len", "64"]  # fmt: skip
    run = [sys.executable, "-m", "strata.cli", "generate", *args]
    done = subprocess.run([*run, "--tensor-parallel-size", "2", "Once upon a time"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tensor parallel: 2 ranks, each with 2 query heads, 1 KV head(s)" in done.stderr
    ref = LLM(str(tiny_chat_folder), device="cpu", kv_cache_memory=0.05, max_model_len=64)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    assert done.stdout.strip() == ref.generate("Once upon a time", params)[0].text.strip()
    bad = subprocess.run([*run, "--tensor-parallel-size", "3", "hi"], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2
    assert "tensor_parallel_size 3 does not divide the model's 4 attention heads" in bad.stderr
