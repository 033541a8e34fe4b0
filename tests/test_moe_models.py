"""MoE decoders (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE) equal HF transformers: greedy tokens
and logits (fp32: max abs diff < 1e-3), alone and in a batch of mixed lengths through a
tiny KV pool; the routed-experts seam computes what a per-token loop computes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    MixtralConfig,
    OlmoeConfig,
    PretrainedConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from strata import LLM, SamplingParams
from strata.config import ModelConfig
from strata.models.fingerprint import weights_fingerprint
from strata.models.loader import load_model
from strata.models.moe import MoeModel
from strata.models.presets import PRESETS
from strata.models.routed_experts import ExpertWeights, ResidentExperts
from tests.conftest import TINY, assert_no_leaks, hf_greedy, make_hf_model
from tests.test_hf_equality import _record_logits

MOE_TINY = {**TINY, "num_key_value_heads": 2, "num_experts_per_tok": 2}

MOE_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    # Renormalised top-2 of 4; per-expert w1/w3/w2 names under block_sparse_moe.
    "mixtral": lambda: MixtralConfig(**MOE_TINY, num_local_experts=4),
    # Top-2 of 8 without renormalisation; q/k norms over whole projections; clipped q/k/v.
    "olmoe": lambda: OlmoeConfig(**MOE_TINY, num_experts=8, clip_qkv=0.5),
    # Shared expert with a sigmoid gate; layer 1 keeps a dense MLP (mlp_only_layers).
    "qwen2_moe": lambda: Qwen2MoeConfig(
        **{**MOE_TINY, "num_hidden_layers": 3},
        num_experts=8,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=96,
        mlp_only_layers=[1],
    ),
    # Per-head q/k norms, head_dim != hidden / heads, q/k/v/o biases, renormalised top-3 of
    # 8, and decoder_sparse_step 2: layer 0 dense, layer 1 MoE.
    "qwen3_moe": lambda: Qwen3MoeConfig(
        **{**MOE_TINY, "num_experts_per_tok": 3},
        head_dim=32,
        attention_bias=True,
        num_experts=8,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        decoder_sparse_step=2,
    ),
}

PROMPTS = [[5, 17, 300, 42, 7, 99, 250, 3, 11], [400, 8], list(range(30, 67))]


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    out = {}
    for name, make in MOE_CONFIGS.items():
        model = make_hf_model(make())
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (folder, model)
    return out


@pytest.mark.parametrize("name", list(MOE_CONFIGS))
def test_greedy_and_logits_match_hf(name: str, moe_models: dict[str, Any]) -> None:
    folder, hf = moe_models[name]
    llm = LLM(str(folder), device="cpu", kv_cache_memory=0.01, block_size=4)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    for prompt in PROMPTS:
        logits = _record_logits(llm)
        out = llm.generate(prompt, params)[0]
        assert out.token_ids == hf_greedy(hf, prompt, 10)
        with torch.no_grad():
            ref = hf(torch.tensor([prompt + out.token_ids])).logits[0]
        expected = ref[len(prompt) - 1 : len(prompt) - 1 + len(out.token_ids)]
        ours = torch.cat(logits)
        assert ours.shape == expected.shape
        assert (ours - expected).abs().max().item() < 1e-3
    assert_no_leaks(llm)


@pytest.mark.parametrize("name", ["qwen2_moe", "qwen3_moe"])
def test_batch_through_a_tiny_pool_matches_hf(name: str, moe_models: dict[str, Any]) -> None:
    """Four prompts of different lengths share 12 blocks of 4 tokens: prefill chunks and
    decodes mix in steps, sequences are preempted and recomputed."""
    folder, hf = moe_models[name]
    prompts = [*PROMPTS, [9, 8, 7, 6, 5]]
    llm = LLM(
        str(folder),
        device="cpu",
        block_size=4,
        num_kv_blocks=12,
        max_model_len=48,
        max_num_batched_tokens=16,
    )
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, 8)
        assert out.finish_reason == "length"
    assert llm.stats()["num_preemptions"] > 0
    assert_no_leaks(llm)


def test_config_reads_moe_fields(moe_models: dict[str, Any]) -> None:
    cfgs = {name: ModelConfig.from_hf(hf.config) for name, (_, hf) in moe_models.items()}
    mixtral, olmoe, qwen2, qwen3 = (cfgs[n] for n in MOE_CONFIGS)
    assert (mixtral.num_experts, mixtral.num_experts_per_tok) == (4, 2)
    assert mixtral.norm_topk_prob and mixtral.moe_intermediate_size == 128
    assert mixtral.moe_layers == (0, 1)
    assert (olmoe.qk_norm, olmoe.clip_qkv, olmoe.norm_topk_prob) == ("full", 0.5, False)
    assert qwen2.moe_layers == (0, 2) and qwen2.shared_expert_intermediate_size == 96
    assert qwen2.qkv_bias and not qwen2.o_bias
    assert (qwen3.qk_norm, qwen3.o_bias, qwen3.head_dim) == ("head", True, 32)
    assert qwen3.moe_layers == (1,)
    too_many = MixtralConfig(**{**MOE_TINY, "num_experts_per_tok": 5}, num_local_experts=4)
    with pytest.raises(ValueError, match=r"num_experts_per_tok \(5\) must be in \[1, num_experts"):
        ModelConfig.from_hf(too_many)


def test_stacked_checkpoint_names_and_hf_state_dict_round_trip(moe_models: dict[str, Any]) -> None:
    """Loading transformers' in-memory names (stacked experts, as GGUF conversion saves them)
    gives the same weights; hf_state_dict loads back into the HF model exactly."""
    _, hf = moe_models["qwen2_moe"]
    model = MoeModel(ModelConfig.from_hf(hf.config), 64)
    model.allocate_experts(torch.device("cpu"), torch.float32, pin=False)
    model.load_weights(hf.state_dict().items())
    ours = model.hf_state_dict()
    theirs = hf.state_dict()
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    with pytest.raises(KeyError, match="experts' weights missing"):
        partial = {k: v for k, v in theirs.items() if "layers.2.mlp.experts.down" not in k}
        model.load_weights(partial.items())


def _naive_experts(w: ExpertWeights, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate, up = (w.gate_up[e] @ x[t]).chunk(2)
            out[t] += weights[t, j] * (w.down[e] @ (torch.nn.functional.silu(gate) * up))
    return out


@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_resident_experts_equal_a_per_token_loop(tokens: int) -> None:
    gen = torch.Generator().manual_seed(tokens)
    num_experts, hidden, inter, k = 6, 16, 24, 3
    w = ExpertWeights(
        layer=4,
        gate_up=torch.randn(num_experts, 2 * inter, hidden, generator=gen),
        down=torch.randn(num_experts, hidden, inter, generator=gen),
    )
    x = torch.randn(tokens, hidden, generator=gen)
    # Distinct experts per token; expert 5 never chosen (a used-expert-only loop must skip it).
    ids = torch.stack([torch.randperm(num_experts - 1, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=gen)
    out = ResidentExperts([w]).forward(4, x, ids, weights)
    assert out.shape == (tokens, hidden) and out.dtype == x.dtype
    torch.testing.assert_close(out, _naive_experts(w, x, ids, weights), rtol=1e-5, atol=1e-4)


def test_expert_weights_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[E, 2F, H\]"):
        ExpertWeights(0, torch.zeros(2, 8, 4), torch.zeros(2, 4, 3))


def test_random_presets_have_the_real_shapes() -> None:
    from strata.models.loader import _hf_config_from_dict

    shapes = {}
    for name in ("olmoe-1b-7b", "qwen3-30b-a3b", "mixtral-8x7b", "qwen1.5-moe-a2.7b"):
        cfg = ModelConfig.from_hf(_hf_config_from_dict(dict(PRESETS[name])))
        shapes[name] = (cfg.num_layers, cfg.num_experts, cfg.num_experts_per_tok,
                        cfg.hidden_size, cfg.moe_intermediate_size)  # fmt: skip
    assert shapes == {
        "olmoe-1b-7b": (16, 64, 8, 2048, 1024),
        "qwen3-30b-a3b": (48, 128, 8, 2048, 768),
        "mixtral-8x7b": (32, 8, 2, 4096, 14336),
        "qwen1.5-moe-a2.7b": (24, 60, 4, 2048, 1408),
    }


def test_random_moe_model_runs_with_experts_on_another_device() -> None:
    """A random preset shrunk to 2 layers: experts stacked per MoE layer where asked;
    the fingerprint covers them."""
    import json
    import tempfile

    raw = {**PRESETS["olmoe-1b-7b"], "num_hidden_layers": 2, "hidden_size": 64,
           "intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 4,
           "vocab_size": 256, "num_experts": 8}  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(raw, f)
    cpu = torch.device("cpu")
    loaded = load_model(f"random:{f.name}", cpu, torch.float32, 64, seed=0, expert_device=cpu)
    Path(f.name).unlink()
    model = loaded.model
    assert isinstance(model, MoeModel)
    assert [(w.layer, w.gate_up.shape, w.down.shape) for w in model.expert_weights] == [
        (0, (8, 64, 64), (8, 64, 32)),
        (1, (8, 64, 64), (8, 64, 32)),
    ]
    assert weights_fingerprint(model.named_weights()) == loaded.fingerprint
    model.expert_weights[1].down[3].mul_(2)
    assert weights_fingerprint(model.named_weights()) != loaded.fingerprint
