"""Real model shapes for `random:NAME`: transformers configs with random weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from strata.errors import ModelLoadError

_LLAMA3_ROPE_1B = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _preset(
    model_type: str, vocab: int, hidden: int, ffn: int, layers: int, heads: int, kv_heads: int,
    max_positions: int, eps: float, rope: float | dict[str, Any], tie: bool,
    bos: int | None, eos: int, **extra: Any,
) -> dict[str, Any]:
    """A transformers config dict: the fields every preset sets, then `extra` ones. `rope`
    is the rope_theta of default RoPE, or the whole rope_parameters."""
    if not isinstance(rope, dict):
        rope = {"rope_type": "default", "rope_theta": rope}
    return {
        "model_type": model_type, "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "max_position_embeddings": max_positions,
        "rms_norm_eps": eps, "rope_parameters": rope, "tie_word_embeddings": tie,
        "bos_token_id": bos, "eos_token_id": eos, **extra,
    }  # fmt: skip


PRESETS: dict[str, dict[str, Any]] = {
    # name: _preset(type, vocab, hidden, ffn, layers, heads, kv heads, max positions, eps,
    #               rope theta (or rope_parameters), tied embeddings, bos, eos, **others)
    "llama-3-8b": _preset(
        "llama", 128256, 4096, 14336, 32, 32, 8, 8192, 1e-5, 500000.0, False, 128000, 128001
    ),
    "llama-3.2-1b": _preset(
        "llama", 128256, 2048, 8192, 16, 32, 8, 131072, 1e-5, _LLAMA3_ROPE_1B, True,
        128000, 128001, head_dim=64,
    ),
    "qwen2.5-7b": _preset(
        "qwen2", 152064, 3584, 18944, 28, 28, 4, 32768, 1e-6, 1000000.0, False, 151643, 151645
    ),
    "qwen2.5-0.5b": _preset(
        "qwen2", 151936, 896, 4864, 24, 14, 2, 32768, 1e-6, 1000000.0, True, 151643, 151645
    ),
    "mistral-7b": _preset(
        "mistral", 32768, 4096, 14336, 32, 32, 8, 32768, 1e-5, 1e6, False, 1, 2,
        head_dim=128, sliding_window=None,
    ),
    "smollm2-135m": _preset(
        "llama", 49152, 576, 1536, 30, 9, 3, 8192, 1e-5, 100000.0, True, 1, 2, head_dim=64
    ),
    # Mixture-of-Experts shapes (the config.json of each Hugging Face repository).
    "olmoe-1b-7b": _preset(  # allenai/OLMoE-1B-7B-0924
        "olmoe", 50304, 2048, 1024, 16, 16, 16, 4096, 1e-5, 10000.0, False, None, 50279,
        num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, clip_qkv=None,
        attention_bias=False, pad_token_id=1,
    ),
    "qwen3-30b-a3b": _preset(  # Qwen/Qwen3-30B-A3B
        "qwen3_moe", 151936, 2048, 6144, 48, 32, 4, 40960, 1e-6, 1000000.0, False,
        151643, 151645, moe_intermediate_size=768, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        attention_bias=False, use_sliding_window=False,
    ),
    "mixtral-8x7b": _preset(  # mistralai/Mixtral-8x7B-v0.1
        "mixtral", 32000, 4096, 14336, 32, 32, 8, 32768, 1e-5, 1000000.0, False, 1, 2,
        num_local_experts=8, num_experts_per_tok=2, sliding_window=None,
    ),
    "qwen1.5-moe-a2.7b": _preset(  # Qwen/Qwen1.5-MoE-A2.7B
        "qwen2_moe", 151936, 2048, 5632, 24, 16, 16, 8192, 1e-6, 1000000.0, False,
        151643, 151643, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
        num_experts=60, num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=1,
        mlp_only_layers=[], use_sliding_window=False,
    ),
}


def random_config_dict(name: str) -> dict[str, Any]:
    """The config dict for `random:NAME`: a preset name or a path to a config JSON."""
    if name in PRESETS:
        return dict(PRESETS[name])
    path = Path(name)
    if path.suffix == ".json" or path.is_file():
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise ModelLoadError(f"config file not found: {path}") from e
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"cannot read config {path}: {e}") from e
        if not isinstance(data, dict) or "model_type" not in data:
            raise ModelLoadError(f"{path} is not a transformers config (no 'model_type')")
        return data
    raise ModelLoadError(
        f"unknown random model {name!r}; presets: {', '.join(sorted(PRESETS))}, "
        "or random:PATH/TO/config.json"
    )
