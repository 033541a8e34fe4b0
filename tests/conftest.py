"""Shared fixtures: tiny transformers models saved as HF folders, and the embedded model."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
)

from strata import LLM, LLMEngine
from strata.models.embedded import embedded_model_path
from strata.models.loader import gguf_to_folder

TINY: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "initializer_range": 0.1,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

TINY_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": lambda: LlamaConfig(**TINY),
    "llama-gqa": lambda: LlamaConfig(**{**TINY, "num_key_value_heads": 2}),
    "llama-tied-mqa": lambda: LlamaConfig(
        **{**TINY, "num_key_value_heads": 1, "tie_word_embeddings": True}
    ),
    "llama3-rope-scaling": lambda: LlamaConfig(
        **{**TINY, "num_key_value_heads": 2, "rope_parameters": LLAMA3_ROPE}
    ),
    "qwen2": lambda: Qwen2Config(**{**TINY, "num_key_value_heads": 2}),
    "mistral": lambda: MistralConfig(**{**TINY, "num_key_value_heads": 2, "sliding_window": None}),
}


def make_hf_model(config: PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):  # HF zero-initialises biases; make them matter
                param.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    """name -> (folder, HF model). The GQA Llama is saved in shards."""
    out = {}
    for name, make in TINY_CONFIGS.items():
        model = make_hf_model(make())
        folder = tmp_path_factory.mktemp(name)
        shard = "60KB" if name == "llama-gqa" else "1GB"
        model.save_pretrained(folder, max_shard_size=shard)
        out[name] = (folder, model)
    return out


@pytest.fixture(scope="session")
def recall_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer GQA Llama (2 KV heads of 16 dims) for the recall store's tests."""
    config = LlamaConfig(**{**TINY, "num_hidden_layers": 4, "num_key_value_heads": 2})
    folder = tmp_path_factory.mktemp("recall-tiny")
    make_hf_model(config, seed=3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def embedded_folder() -> Path:
    return gguf_to_folder(embedded_model_path())


@pytest.fixture(scope="session")
def tiny_chat_folder(embedded_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the embedded model's tokenizer and chat template: text in,
    text out, at a millisecond a step."""
    from transformers import AutoTokenizer

    config = LlamaConfig(
        **{**TINY, "vocab_size": 49152, "num_key_value_heads": 2, "max_position_embeddings": 1024}
    )
    folder = tmp_path_factory.mktemp("tiny-chat")
    make_hf_model(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded_folder).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def embedded_hf(embedded_folder: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(embedded_folder, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def embedded_llm() -> Iterator[LLM]:
    llm = LLM(device="cpu", kv_cache_memory=0.5)
    yield llm
    llm.check_integrity()


def hf_greedy(model: Any, prompt: list[int], n: int, stop_ids: set[int] | None = None) -> list[int]:
    """Greedy continuation by full recomputation: the plainest possible oracle."""
    ids = list(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            token = int(logits.argmax())
            out.append(token)
            ids.append(token)
            if stop_ids and token in stop_ids:
                break
    return out


def assert_no_leaks(llm: LLM) -> None:
    llm.check_integrity()
    stats = llm.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0


# ---- an integrity check after every test that built or used an engine ---------------------

_engines: weakref.WeakSet[LLMEngine] = weakref.WeakSet()


@pytest.fixture(scope="session", autouse=True)
def _record_engines() -> Iterator[None]:
    """Every LLMEngine constructed in this session is recorded (weakly)."""
    original = LLMEngine.__init__

    def recording_init(self: LLMEngine, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _engines.add(self)

    LLMEngine.__init__ = recording_init  # type: ignore[method-assign]
    yield
    LLMEngine.__init__ = original  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _check_engine_integrity(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test, every live engine that is idle passes check_integrity(): its block
    pool, prefix index, queues, tails and tiers agree. Busy engines (a server's, mid-request)
    are left alone: the check may only run where nothing steps the engine concurrently.
    Tests that break an engine on purpose opt out with @pytest.mark.breaks_engine."""
    yield
    if request.node.get_closest_marker("breaks_engine") is not None:
        return
    for engine in list(_engines):
        if not engine.has_unfinished():
            engine.check_integrity()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "breaks_engine: the test leaves an engine inconsistent on purpose"
    )
