"""`random:PATH/config.json` takes the tokenizer saved beside the config (the GPU machine
has no embedded model to borrow one from), and runs text prompts with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from strata import LLM, SamplingParams
from strata.errors import InvalidRequestError
from tests.conftest import TINY


def test_random_config_takes_the_tokenizer_beside_it(
    embedded_folder: Path, tmp_path: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(embedded_folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|beside_the_config|>"]})
    tokenizer.save_pretrained(tmp_path)  # one token more than the embedded one
    config = {**TINY, "model_type": "llama", "vocab_size": 49160}
    (tmp_path / "config.json").write_text(json.dumps(config))
    llm = LLM(f"random:{tmp_path / 'config.json'}", device="cpu", kv_cache_memory=0.05)
    assert llm.get_tokenizer() is not None
    assert len(llm.get_tokenizer()) == len(tokenizer) == 49153
    out = llm.generate(["Hello there"], SamplingParams(max_tokens=3, temperature=0.0))[0]
    assert out.prompt_token_ids == tokenizer("Hello there").input_ids
    assert len(out.token_ids) == 3


def test_a_prompt_the_model_cannot_embed_is_refused_alone(
    embedded_folder: Path, tmp_path: Path
) -> None:
    # A tokenizer with ids past the model's embedding (added tokens, a mismatched pair):
    # the request gets a clear error before it is queued; the engine runs on.
    AutoTokenizer.from_pretrained(embedded_folder).save_pretrained(tmp_path)
    config = {**TINY, "model_type": "llama", "vocab_size": 1000}
    (tmp_path / "config.json").write_text(json.dumps(config))
    llm = LLM(f"random:{tmp_path / 'config.json'}", device="cpu", kv_cache_memory=0.05)
    params = SamplingParams(max_tokens=3, temperature=0.0)
    with pytest.raises(InvalidRequestError, match=r"outside model .* vocabulary of 1000 ids"):
        llm.generate(["Hello there"], params)
    out = llm.generate([[5, 6, 7]], params)[0]
    assert len(out.token_ids) == 3
    assert not llm.engine.has_unfinished()
