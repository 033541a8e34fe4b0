"""Bad input gets a clear error naming the problem and the limit; nothing leaks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from strata import (
    LLM,
    InvalidRequestError,
    KVCacheTooSmallError,
    ModelLoadError,
    SamplingParams,
    UnsupportedModelError,
)
from tests.conftest import assert_no_leaks


@pytest.fixture(scope="module")
def llm(tiny_models: dict[str, Any]) -> LLM:
    folder, _ = tiny_models["llama"]
    return LLM(str(folder), device="cpu", num_kv_blocks=64, block_size=4, max_model_len=64)


def _still_serves(llm: LLM) -> None:
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 3
    assert_no_leaks(llm)


def test_empty_prompt(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([[]], SamplingParams())
    assert llm.generate([], SamplingParams()) == []  # no prompts is no work, not an error
    _still_serves(llm)


def test_empty_text_prompt(embedded_llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="empty"):
        embedded_llm.generate("", SamplingParams())
    assert_no_leaks(embedded_llm)


def test_prompt_longer_than_context(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match=r"70 tokens.*holds 64"):
        llm.generate([[3] * 70], SamplingParams())
    _still_serves(llm)


def test_max_tokens_beyond_context(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match=r"max_tokens \(60\).*exceeds.*64.*at most 54"):
        llm.generate([[3] * 10], SamplingParams(max_tokens=60))
    _still_serves(llm)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"max_tokens": -5}, "max_tokens must be an integer >= 1"),
        ({"temperature": -0.1}, "temperature must be a finite number >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -2}, "top_k must be -1"),
        ({"top_k": 2**63}, "top_k must be -1"),
        ({"seed": 2**32}, r"seed must be an integer in \[0, 4294967295\]"),
        ({"max_tokens": True}, "max_tokens must be an integer >= 1"),
    ],
)
def test_invalid_sampling_params(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)


def test_one_bad_prompt_queues_none(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="token ids must be integers in"):
        llm.generate([[5, 6], [7, 100000]], SamplingParams(max_tokens=2))
    _still_serves(llm)


def test_text_prompt_without_tokenizer(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="no tokenizer"):
        llm.generate("hello", SamplingParams())
    _still_serves(llm)


def test_nonexistent_model_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(str(tmp_path / "nope"), device="cpu")


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        LLM(str(tmp_path), device="cpu")


def test_unreadable_weights(tmp_path: Path, tiny_models: dict[str, Any]) -> None:
    folder, _ = tiny_models["llama"]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot read"):
        LLM(str(tmp_path), device="cpu")


def test_non_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match=r"not a \.gguf"):
        LLM(str(path), device="cpu")


def test_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(UnsupportedModelError, match=r"'gpt2'.*supported: llama.*qwen2.*mistral"):
        LLM(str(tmp_path), device="cpu")


def test_unknown_random_preset() -> None:
    with pytest.raises(ModelLoadError, match=r"presets: .*llama-3-8b"):
        LLM("random:llama-99b", device="cpu")


def test_kv_pool_too_small(tiny_models: dict[str, Any]) -> None:
    folder, _ = tiny_models["llama"]
    with pytest.raises(KVCacheTooSmallError, match=r"holds 3 blocks.*needs 16 blocks"):
        LLM(str(folder), device="cpu", num_kv_blocks=3, block_size=4, max_model_len=64)


def test_invalid_engine_config() -> None:
    with pytest.raises(ValueError, match="block_size must be a positive power of two"):
        LLM("random:smollm2-135m", device="cpu", block_size=12)


def test_duplicate_request_id(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request([5, 6], SamplingParams(max_tokens=2), request_id="same")
    with pytest.raises(InvalidRequestError, match="request id 'same' is already in use"):
        engine.add_request([7, 8], SamplingParams(max_tokens=2), request_id="same")
    while engine.has_unfinished():
        engine.step()
    _still_serves(llm)
