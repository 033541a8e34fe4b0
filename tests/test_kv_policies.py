"""KV policies on a tiny random GQA Llama: exact kept tokens, freed blocks, no leaks.

The kept tokens are checked against a direct computation from transformers' attention
weights (eager attention, fp32) of the same prompt; StreamingLLM's outputs are checked
against transformers run with the equivalent attention mask.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_no_leaks

from strata import LLM, SamplingParams
from strata.engine.sequence import Sequence
from strata.kv.policies.base import AttentionShape
from strata.kv.policies.chunkkv import ChunkKVPolicy
from strata.kv.policies.h2o import H2OPolicy
from strata.kv.policies.pyramidkv import PyramidKVPolicy
from strata.kv.policies.registry import create_policy
from strata.kv.policies.runtime.observer import DecodeBatch
from strata.kv.policies.snapkv import SnapKVPolicy
from strata.kv.policies.streaming import StreamingPolicy
from tests.kv_policy_support import (
    BLOCK,
    GREEDY,
    GROUP,
    KV_HEADS,
    LAYERS,
    PROMPT,
    compress,
    kept,
    params,
    policy_llm,
    tiny_policy_model,
    top,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    return tiny_policy_model(tmp_path_factory, "tiny-policies")


@pytest.fixture(scope="module")
def llm(tiny: tuple[Path, Any]) -> Iterator[LLM]:
    engine = policy_llm(tiny[0])
    yield engine
    assert_no_leaks(engine)


@pytest.fixture(scope="module")
def attentions(tiny: tuple[Path, Any]) -> list[torch.Tensor]:
    """Per layer [heads, C, C]: transformers' attention probabilities over the prompt."""
    with torch.no_grad():
        out = tiny[1](torch.tensor([PROMPT]), output_attentions=True)
    return [a[0].float() for a in out.attentions]


def per_kv_head(probs: torch.Tensor) -> torch.Tensor:
    """[heads, ...] -> [kv_heads, ...]: summed over each KV head's query heads."""
    return probs.view(KV_HEADS, GROUP, *probs.shape[1:]).sum(dim=1)


def expected_snapkv(attn: torch.Tensor, k: int) -> list[set[int]]:
    c, w = len(PROMPT), SnapKVPolicy.WINDOW
    votes = per_kv_head(attn[:, c - w :, :].sum(dim=1))[:, : c - w]
    pooled = F.avg_pool1d(votes[:, None], SnapKVPolicy.KERNEL, 1, SnapKVPolicy.KERNEL // 2)
    window = set(range(c - w, c))
    return [window | top(row, k - w) for row in pooled[:, 0]]


def release(llm: LLM, seq: Sequence) -> None:
    llm.engine.abort(seq.request_id)
    assert_no_leaks(llm)


# ---- each policy keeps exactly its tokens, and frees the blocks -------------------------


def test_streaming_keeps_sinks_and_recent_window(llm: LLM) -> None:
    seq = compress(llm, params("streaming", 0.25))
    c, k = len(PROMPT), 30
    expected = set(range(StreamingPolicy.NUM_SINKS)) | set(range(c - (k - 4), c))
    for layer in range(LAYERS):
        assert kept(seq, layer) == [expected] * KV_HEADS
    table = llm.engine.kv.block_table(seq.request_id)
    assert len(table) == -(-k // BLOCK)  # 8 blocks instead of 30: the rest are free
    assert llm.stats()["kv_blocks_free"] == 160 - len(table)
    assert not any(llm.engine.kv.index.key_of(b) for b in table)  # never indexed
    release(llm, seq)


def test_snapkv_keeps_window_and_pooled_votes(llm: LLM, attentions: list[torch.Tensor]) -> None:
    seq = compress(llm, params("snapkv", 80))
    for layer in range(LAYERS):
        assert kept(seq, layer) == expected_snapkv(attentions[layer], 80)
    assert len(llm.engine.kv.block_table(seq.request_id)) == 80 // BLOCK
    release(llm, seq)


def test_chunkkv_keeps_whole_chunks_by_window_votes(
    llm: LLM, attentions: list[torch.Tensor]
) -> None:
    c, w, size = len(PROMPT), ChunkKVPolicy.WINDOW, ChunkKVPolicy.CHUNK
    k = w + 2 * size + 4  # beyond the window: 2 whole chunks and 4 tokens of a third
    seq = compress(llm, params("chunkkv", k))
    for layer in range(LAYERS):
        votes = attentions[layer][:, c - w :, : c - w].sum(dim=(0, 1))  # every head, summed
        chunks = [list(range(a, min(a + size, c - w))) for a in range(0, c - w, size)]
        by_total = sorted(chunks, key=lambda ch: -float(votes[ch].sum()))
        expected = set(range(c - w, c)) | set(by_total[0]) | set(by_total[1])
        expected |= set(sorted(by_total[2], key=lambda t: -float(votes[t]))[:4])
        assert kept(seq, layer) == [expected] * KV_HEADS  # every KV head: the same chunks
    assert len(llm.engine.kv.block_table(seq.request_id)) == k // BLOCK
    release(llm, seq)


def test_pyramidkv_budgets_shrink_with_depth(llm: LLM, attentions: list[torch.Tensor]) -> None:
    seq = compress(llm, params("pyramidkv", 80))
    assert seq.kv is not None
    budgets = seq.kv.compress_budgets()
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > 80 > budgets[-1]
    assert abs(sum(budgets) / LAYERS - 80) < 1
    for layer, k in enumerate(budgets):
        assert seq.kv.num_slots(layer) == k
        assert kept(seq, layer) == expected_snapkv(attentions[layer], k)
    # Blocks are shared by the layers: the sequence holds its largest layer's budget.
    assert len(llm.engine.kv.block_table(seq.request_id)) == -(-budgets[0] // BLOCK)
    release(llm, seq)


def test_h2o_keeps_heavy_hitters_and_recent(llm: LLM, attentions: list[torch.Tensor]) -> None:
    seq = compress(llm, params("h2o", 0.25))
    c, k = len(PROMPT), 30
    recent = set(range(c - k // 2, c))
    for layer in range(LAYERS):
        accumulated = per_kv_head(attentions[layer].sum(dim=1))[:, : c - k // 2]
        expected = [recent | top(row, k - k // 2) for row in accumulated]
        assert kept(seq, layer) == expected
    release(llm, seq)


def test_tova_keeps_what_the_last_query_attends(llm: LLM, attentions: list[torch.Tensor]) -> None:
    seq = compress(llm, params("tova", 0.25))
    for layer in range(LAYERS):
        last = attentions[layer][:, -1, :].mean(dim=0)
        assert kept(seq, layer) == [top(last, 30)] * KV_HEADS
    release(llm, seq)


@pytest.mark.parametrize("policy", ["streaming", "h2o", "tova"])
def test_evicting_policies_hold_the_cap_while_decoding(llm: LLM, policy: str) -> None:
    seq = compress(llm, params(policy, 0.25, max_tokens=12))
    assert seq.kv is not None
    while not seq.finished:
        llm.engine.step()
        if not seq.finished:
            assert seq.kv.max_slots == 30  # one in, one out
            assert len(llm.engine.kv.block_table(seq.request_id)) <= -(-31 // BLOCK)
    assert_no_leaks(llm)


@pytest.mark.parametrize("policy", ["streaming", "h2o", "tova", "treekv"])
def test_evict_interval_frees_a_block_at_a_time(tiny: Any, policy: str) -> None:
    """By default the cache grows to cap + block_size - 1 and then evicts back to the cap,
    one compaction per block_size decode steps."""
    llm = LLM(str(tiny[0]), device="cpu", num_kv_blocks=160, block_size=BLOCK)
    seq = compress(llm, params(policy, 0.25, max_tokens=14))
    assert seq.kv is not None
    compactions = seq.kv.num_compactions
    sizes = []
    while not seq.finished:
        llm.engine.step()
        if not seq.finished:
            sizes.append(seq.kv.max_slots)
    # cap 30. The prefill samples token 1; the 13 decode steps cache tokens 1..13, and the
    # 12 that do not finish go 31, 32, 33, then the 4th reaches 30 + BLOCK and is evicted
    # back to 30, and so on
    assert sizes == [31, 32, 33, 30] * 3
    assert seq.kv.num_compactions - compactions == 3
    if policy == "streaming":
        sinks = set(range(StreamingPolicy.NUM_SINKS))
        last = len(PROMPT) + 11  # the newest token cached at the last eviction
        assert kept(seq, 0)[0] >= sinks | set(range(last - 25, last + 1))
    assert_no_leaks(llm)


def test_streaming_decodes_like_sliding_window_attention(llm: LLM, tiny: Any) -> None:
    """Tokens equal transformers with each query attending to the sinks and its window."""
    k, n = 30, 10
    out = llm.generate([PROMPT], params("streaming", k, max_tokens=n))[0].token_ids
    ids, c, sinks = list(PROMPT), len(PROMPT), StreamingPolicy.NUM_SINKS
    expected: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            t = len(ids)
            q, key = torch.arange(t)[:, None], torch.arange(t)[None, :]
            allowed = key <= q
            # After the prompt, a query sees the sinks and the newest k - sinks + 1 tokens.
            window = (key < sinks) | (key >= q - (k - sinks))
            allowed &= (q < c) | window
            mask = torch.zeros(1, 1, t, t).masked_fill(~allowed, float("-inf"))
            logits = tiny[1](torch.tensor([ids]), attention_mask=mask).logits[0, -1]
            expected.append(int(logits.argmax()))
            ids.append(expected[-1])
    assert out == expected
    assert_no_leaks(llm)


# ---- full, mixed batches, chunked prefill, preemption ---------------------------------


def test_full_equals_no_policy(llm: LLM) -> None:
    plain = llm.generate([PROMPT], SamplingParams(max_tokens=12, **GREEDY))[0].token_ids
    full = llm.generate([PROMPT], params("full", 0.5, max_tokens=12))[0].token_ids
    unbounded = llm.generate([PROMPT], params("h2o", 1000, max_tokens=12))[0].token_ids
    assert full == plain and unbounded == plain
    assert_no_leaks(llm)


MIXED = [
    ("full", 0.5, None),
    ("snapkv", 80, None),
    ("pyramidkv", 90, None),
    ("h2o", 0.3, None),
    ("tova", 40, None),
    ("snapkv", 70, 100),
    ("streaming", 20, 90),
]


def test_mixed_batch_equals_solo_runs(llm: LLM, tiny: Any) -> None:
    prompts = [PROMPT[i:] + PROMPT[:i] for i in range(len(MIXED))]
    batch = [params(p, b, kv_compress_prefix=n, max_tokens=6) for p, b, n in MIXED]
    together = [o.token_ids for o in llm.generate(prompts, batch)]
    alone = [llm.generate([p], b)[0].token_ids for p, b in zip(prompts, batch, strict=True)]
    assert together == alone
    # Small steps: prefill in chunks, the observation window split between them.
    chunked = LLM(str(tiny[0]), device="cpu", num_kv_blocks=400, block_size=BLOCK,
                  max_num_batched_tokens=24, kv_evict_interval=1)  # fmt: skip
    assert [o.token_ids for o in chunked.generate(prompts, batch)] == alone
    assert_no_leaks(chunked)
    assert_no_leaks(llm)


@pytest.mark.parametrize("policy", ["h2o", "tova", "treekv"])
def test_decode_rows_scored_together_keep_what_each_alone_keeps(
    tiny: Any, policy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoding sequences are scored in one batch per layer (DecodeBatch); each keeps
    exactly the slots it keeps when it decodes alone."""
    batch_sizes: list[int] = []
    observe = DecodeBatch.observe

    def counting(self: DecodeBatch, layer: int, q: torch.Tensor, scale: float) -> None:
        batch_sizes.append(len(self.sequences))
        observe(self, layer, q, scale)

    monkeypatch.setattr(DecodeBatch, "observe", counting)

    def kept_after_decoding(prompts: list[list[int]]) -> list[list[list[set[int]]]]:
        llm = LLM(str(tiny[0]), device="cpu", num_kv_blocks=400, block_size=BLOCK,
                  kv_evict_interval=1)  # fmt: skip
        engine = llm.engine
        seqs = [engine._seqs[engine.add_request(p, params(policy, 0.25, max_tokens=12))]
                for p in prompts]  # fmt: skip
        for _ in range(8):  # the prefill, then 7 decode steps that each evict
            engine.step()
        result = [[kept(seq, layer) for layer in range(LAYERS)] for seq in seqs]
        for seq in seqs:
            engine.abort(seq.request_id)
        assert_no_leaks(llm)
        return result

    prompts = [PROMPT[10 * i :] for i in range(3)]  # caps 30, 27, 25: rows padded
    together = kept_after_decoding(prompts)
    assert batch_sizes and set(batch_sizes) == {3}
    alone = [kept_after_decoding([p])[0] for p in prompts]
    assert together == alone


def test_preempted_snapkv_request_recomputes_to_the_same_tokens(tiny: Any) -> None:
    roomy = LLM(str(tiny[0]), device="cpu", num_kv_blocks=200, block_size=BLOCK)
    tight = LLM(str(tiny[0]), device="cpu", num_kv_blocks=48, block_size=BLOCK, max_model_len=192)
    prompts = [PROMPT, PROMPT[::-1], PROMPT[5:] + PROMPT[:5]]
    batch = [params("snapkv", 70, max_tokens=40)] * 3
    expected = [o.token_ids for o in roomy.generate(prompts, batch)]
    assert [o.token_ids for o in tight.generate(prompts, batch)] == expected
    assert tight.stats()["num_preemptions"] > 0
    assert_no_leaks(tight)


# ---- prefix cache and the query-agnostic context -----------------------------------------


def test_uncompressed_prefix_stays_cached(tiny: Any) -> None:
    llm = LLM(str(tiny[0]), device="cpu", num_kv_blocks=160, block_size=BLOCK)
    first = llm.generate([PROMPT], params("snapkv", 80))[0]
    # The compacted blocks were copies: the prompt's blocks are all still indexed.
    full = llm.generate([PROMPT], SamplingParams(max_tokens=4, **GREEDY))[0]
    assert full.num_cached_tokens == (len(PROMPT) - 1) // BLOCK * BLOCK
    # Another snapkv request reuses the prompt up to its observation window.
    again = llm.generate([PROMPT], params("snapkv", 80))[0]
    assert again.num_cached_tokens == (len(PROMPT) - SnapKVPolicy.WINDOW) // BLOCK * BLOCK
    assert again.token_ids == first.token_ids
    assert_no_leaks(llm)


def test_compress_prefix_keeps_the_question_whole(llm: LLM) -> None:
    context, question = PROMPT[:100], PROMPT[100:]
    seq = compress(llm, params("streaming", 0.2, kv_compress_prefix=100))
    assert seq.num_computed == 100  # compressed before the question was computed
    while seq.num_computed < len(PROMPT):
        llm.engine.step()
    expected = set(range(4)) | set(range(100 - 16, 100)) | set(range(100, 100 + len(question)))
    assert kept(seq, 0) == [expected] * KV_HEADS
    assert seq.kv is not None and seq.kv.decode_cap == 20 + len(question)
    assert len(context) == 100
    release(llm, seq)


# ---- names, budgets and errors ------------------------------------------------------------


def test_budget_resolution_and_errors(llm: LLM, tiny: Any) -> None:
    with pytest.raises(ValueError, match="valid: full, streaming, h2o, snapkv"):
        SamplingParams(kv_policy="snap")
    for bad in (0, -1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="kv_budget"):
            SamplingParams(kv_policy="h2o", kv_budget=bad)
    with pytest.raises(ValueError, match="needs a kv_budget"):
        llm.generate([PROMPT], SamplingParams(kv_policy="h2o"))
    with pytest.raises(ValueError, match="longer than the prompt"):
        llm.generate([PROMPT], params("h2o", 0.5, kv_compress_prefix=500))
    with pytest.raises(ValueError, match="needs a kv_budget"):
        LLM(str(tiny[0]), device="cpu", num_kv_blocks=64, kv_policy="tova")
    assert_no_leaks(llm)


def test_engine_default_policy(tiny: Any) -> None:
    llm = LLM(str(tiny[0]), device="cpu", num_kv_blocks=160, block_size=BLOCK,
              kv_policy="streaming", kv_budget=0.25)  # fmt: skip
    default = llm.generate([PROMPT], SamplingParams(max_tokens=6, **GREEDY))[0].token_ids
    assert llm.stats()["kv_tokens_evicted"] >= len(PROMPT) - 30
    named = llm.generate([PROMPT], params("streaming", 0.25, max_tokens=6))[0].token_ids
    full = llm.generate([PROMPT], params("full", 0.25, max_tokens=6))[0].token_ids
    assert default == named != full
    assert_no_leaks(llm)


def test_pyramid_budgets_average_the_budget() -> None:
    policy = create_policy("pyramidkv", AttentionShape(30, 9, 3, 64))
    assert isinstance(policy, PyramidKVPolicy)

    class View:
        context_len = 4096

    budgets = policy.layer_budgets(512, View())  # type: ignore[arg-type]
    assert budgets[0] > budgets[-1] >= SnapKVPolicy.WINDOW
    assert abs(sum(budgets) / 30 - 512) < 1
    assert isinstance(create_policy("h2o", AttentionShape(2, 4, 2, 16)), H2OPolicy)


def test_http_body_fields_reach_sampling_params() -> None:
    from strata.server.protocol import CompletionRequest

    body = CompletionRequest(
        model="m", prompt="hi", kv_policy="snapkv", kv_budget=0.125, kv_compress_prefix=7
    )
    p = body.sampling_params(max_tokens=4, logprobs=None)
    assert (p.kv_policy, p.kv_budget, p.kv_compress_prefix) == ("snapkv", 0.125, 7)
    with pytest.raises(ValueError, match="valid: full"):
        CompletionRequest(model="m", prompt="hi", kv_policy="nope").sampling_params(4, None)
