"""treekv, expected_attention and kvzip on a tiny random GQA Llama: the kept tokens equal
a direct computation from transformers' tensors (eager attention, fp32), blocks are
freed, nothing leaks; mixed batches equal solo runs."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from strata import LLM
from strata.engine.sequence import Sequence
from strata.kv.policies.base import AttentionShape
from strata.kv.policies.expected_attention import ExpectedAttentionPolicy
from strata.kv.policies.kvzip import FIRST_PROMPT, LATER_PROMPT, KVzipPolicy, chat_suffix
from strata.kv.policies.model_access import ModelAccess
from tests.conftest import TINY, assert_no_leaks
from tests.kv_policy_support import (
    BLOCK,
    GROUP,
    HEADS,
    KV_HEADS,
    LAYERS,
    PROMPT,
    C,
    compress,
    kept,
    params,
    policy_llm,
    tiny_policy_model,
    top,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    return tiny_policy_model(tmp_path_factory, "tiny-policies-k2")


@pytest.fixture(scope="module")
def llm(tiny: tuple[Path, Any]) -> Iterator[LLM]:
    engine = policy_llm(tiny[0])
    yield engine
    assert_no_leaks(engine)


def hf_run(tiny: Any, ids: list[int]) -> Any:
    with torch.no_grad():
        return tiny[1](torch.tensor([ids]), output_attentions=True, use_cache=True)


def release(llm: LLM, seq: Sequence, table_blocks: int) -> None:
    assert len(llm.engine.kv.block_table(seq.request_id)) == table_blocks
    assert llm.stats()["kv_blocks_free"] == 160 - table_blocks
    llm.engine.abort(seq.request_id)
    assert_no_leaks(llm)


# ---- treekv ------------------------------------------------------------------------------


def tree_sweep(avg: list[float], keep: int) -> set[int]:
    """TreeKV by its definition, on plain lists: each token past `keep` evicts the lower
    of the pair at the cursor (the older on a tie); the cursor moves right and wraps
    before reaching the new token."""
    cache, cursor = list(range(keep)), 0
    for token in range(keep, len(avg)):
        cache.append(token)
        if cursor + 1 >= keep:
            cursor = 0
        left, right = cache[cursor], cache[cursor + 1]
        del cache[cursor + 1 if avg[right] < avg[left] else cursor]
        cursor += 1
    return set(cache)


def test_treekv_keeps_the_swept_tree(llm: LLM, tiny: Any) -> None:
    attentions = hf_run(tiny, PROMPT).attentions
    seq = compress(llm, params("treekv", 0.25))
    k = 30
    for layer in range(LAYERS):
        received = attentions[layer][0].view(KV_HEADS, GROUP, C, C).sum(dim=(1, 2))
        avg = received / (C - torch.arange(C))  # queries that could attend each token
        assert kept(seq, layer) == [tree_sweep(row.tolist(), k) for row in avg]
    # dense near the end, sparse far back
    for s in kept(seq, 0):
        assert C - 1 in s and len({p for p in s if p >= 90}) > 3 * len({p for p in s if p < 30})
    release(llm, seq, -(-k // BLOCK))


def test_treekv_holds_its_cap_while_decoding(llm: LLM) -> None:
    seq = compress(llm, params("treekv", 0.25, max_tokens=12))
    assert seq.kv is not None
    while not seq.finished:
        llm.engine.step()
        if not seq.finished:
            assert seq.kv.max_slots == 30
            assert len(llm.engine.kv.block_table(seq.request_id)) <= -(-31 // BLOCK)
    assert_no_leaks(llm)


# ---- expected attention ------------------------------------------------------------------


def test_expected_attention_keeps_the_expected_attention_top(llm: LLM, tiny: Any) -> None:
    model = tiny[1]
    pre_rope: list[torch.Tensor] = []
    hooks = [
        layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: pre_rope.append(o[0]))
        for layer in model.model.layers
    ]
    try:
        out = hf_run(tiny, PROMPT)
    finally:
        for hook in hooks:
            hook.remove()
    seq = compress(llm, params("expected_attention", 40))
    sinks, future, d = 4, ExpectedAttentionPolicy.FUTURE, TINY["hidden_size"] // HEADS
    positions = torch.arange(C, C + future)[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    half = torch.zeros(d, d, dtype=torch.float64)  # P x = rotate_half(x)
    half[d // 2 :, : d // 2], half[: d // 2, d // 2 :] = torch.eye(d // 2), -torch.eye(d // 2)
    rotation = (
        cos[0].double()[:, :, None] * torch.eye(d, dtype=torch.float64)
        + sin[0].double()[:, :, None] * half
    ).mean(dim=0)
    for layer in range(LAYERS):
        q = pre_rope[layer][sinks:].double().view(-1, HEADS, d)  # the queries after the sinks
        mean = q.mean(dim=0)
        centred = q - mean
        cov = torch.einsum("nhi,nhj->hij", centred, centred) / q.shape[0]
        mean, cov = mean @ rotation.T, rotation @ cov @ rotation.T
        keys = out.past_key_values.layers[layer].keys[0, :, sinks:].double()  # [kv, n, d]
        values = out.past_key_values.layers[layer].values[0, :, sinks:].double()
        keys = keys.repeat_interleave(GROUP, dim=0)
        logits = torch.einsum("hd,hnd->hn", mean, keys) / math.sqrt(d)
        logits += torch.einsum("hni,hij,hnj->hn", keys, cov, keys) / d / 2
        probs = torch.softmax(logits, dim=-1).view(KV_HEADS, GROUP, -1).mean(dim=1)
        scores = probs * values.norm(dim=-1)
        expected = [set(range(sinks)) | {sinks + i for i in top(row, 40 - sinks)} for row in scores]
        assert kept(seq, layer) == expected
    release(llm, seq, 40 // BLOCK)


# ---- kvzip -------------------------------------------------------------------------------


def test_kvzip_keeps_what_reconstruction_attends(
    llm: LLM, tiny: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two passes (pieces [0, 64) and [64, 120)); the tiny model has no tokenizer, so a
    pass is the previous piece's last 8 tokens (after the first) and its piece."""
    monkeypatch.setattr(KVzipPolicy, "CHUNK", 64)
    passes = [PROMPT[:64], PROMPT[56:64] + PROMPT[64:]]
    before = llm.stats()["kv_reconstruction_tokens"]
    seq = compress(llm, params("kvzip", 0.25))
    assert llm.stats()["kv_reconstruction_tokens"] - before == sum(len(p) for p in passes)
    best = torch.zeros(LAYERS, KV_HEADS, C)
    for ids, (a, b) in zip(passes, [(0, 64), (64, C)], strict=True):
        attentions = hf_run(tiny, PROMPT + ids).attentions
        for layer in range(LAYERS):
            rows = attentions[layer][0, :, C:, a:b]  # the pass's queries on its piece
            best[layer, :, a:b] = rows.reshape(KV_HEADS, -1, b - a).amax(dim=1)
    for layer in range(LAYERS):
        expected = [set(range(4)) | {4 + i for i in top(row[4:], 30 - 4)} for row in best[layer]]
        assert kept(seq, layer) == expected
    release(llm, seq, -(-30 // BLOCK))


def test_kvzip_passes_past_max_model_len(
    llm: LLM, tiny: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A context that fills max_model_len: the passes run at positions past it and keep
    exactly what an engine with room to spare keeps."""
    monkeypatch.setattr(KVzipPolicy, "CHUNK", 64)
    short = LLM(str(tiny[0]), device="cpu", num_kv_blocks=160, block_size=BLOCK,
                max_model_len=C + 8)  # fmt: skip
    seq = compress(short, params("kvzip", 0.25))
    reference = compress(llm, params("kvzip", 0.25))
    for layer in range(LAYERS):
        assert kept(seq, layer) == kept(reference, layer)
    assert short.stats()["kv_reconstruction_tokens"] == 64 + 8 + (C - 64)
    release(short, seq, -(-30 // BLOCK))
    release(llm, reference, -(-30 // BLOCK))


def test_kvzip_passes_ask_to_repeat_the_context(embedded_folder: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(embedded_folder)
    policy = KVzipPolicy(AttentionShape(2, 4, 2, 16))
    policy.CHUNK = 50
    policy.bind(ModelAccess(torch.ones(8), 1.0, tokenizer))
    context = list(range(1000, 1120))

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    suffix = encode(chat_suffix(tokenizer))
    assert "assistant" in chat_suffix(tokenizer)
    assert policy.reconstruction_passes(context) == [
        encode(FIRST_PROMPT) + suffix + context[:50],
        encode(LATER_PROMPT) + context[42:50] + suffix + context[50:100],
        encode(LATER_PROMPT) + context[92:100] + suffix + context[100:],
    ]


# ---- together ----------------------------------------------------------------------------


def test_mixed_batch_equals_solo_runs(llm: LLM, tiny: Any) -> None:
    mixed = [("treekv", 30, None), ("expected_attention", 0.3, None), ("kvzip", 0.25, 90),
             ("full", 0.5, None)]  # fmt: skip
    prompts = [PROMPT[i:] + PROMPT[:i] for i in range(len(mixed))]
    batch = [params(p, b, kv_compress_prefix=n) for p, b, n in mixed]
    together = [o.token_ids for o in llm.generate(prompts, batch)]
    alone = [llm.generate([p], b)[0].token_ids for p, b in zip(prompts, batch, strict=True)]
    assert together == alone
    chunked = LLM(str(tiny[0]), device="cpu", num_kv_blocks=400, block_size=BLOCK,
                  max_num_batched_tokens=24, kv_evict_interval=1)  # fmt: skip
    assert [o.token_ids for o in chunked.generate(prompts, batch)] == alone
    assert_no_leaks(chunked)
    assert_no_leaks(llm)
