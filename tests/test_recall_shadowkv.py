"""shadowkv (strata/kv/recall/shadowkv.py): landmarks, outliers and low-rank keys.

Exact where it must be: landmarks, spread and scores equal their definitions; outliers
are always picked with their exact keys, kept on the GPU; keys rebuilt from the factors equal
the real post-RoPE keys when their rank fits, and an engine decoding with rebuilt keys
gives the tokens of the same policy fetching every key.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from strata import SamplingParams
from strata.kv.recall.policy import SummaryRoom
from strata.kv.recall.shadowkv import RANK, ShadowKVPolicy
from strata.models.rope import RotaryEmbedding
from tests.test_recall import GREEDY, PROMPT, assert_recall_idle, prefilled, recall_llm, tokens

BLOCK = 16  # two 8-token chunks per block


def rotary(head_dim: int) -> RotaryEmbedding:
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, rope_theta=500.0)
    return RotaryEmbedding(config, head_dim, max_positions=64 * BLOCK)


def rotate(rope: RotaryEmbedding, pre: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE keys [kv_heads, blocks, BLOCK, dim] of middle blocks 0.. -> post-RoPE."""
    kvh, n, bs, d = pre.shape
    positions = torch.arange(BLOCK, BLOCK + n * bs)  # middle block 0 follows the sink
    flat = pre.permute(1, 2, 0, 3).reshape(n * bs, kvh, d)
    _, keys = rope(positions, torch.zeros(n * bs, 1, d), flat)
    return keys.view(n, bs, kvh, d).permute(2, 0, 1, 3)


def shadowkv(
    kv_heads: int, dim: int, blocks: int, slots: int, landmark_tokens: int = 8
) -> ShadowKVPolicy:
    policy = ShadowKVPolicy()
    room = SummaryRoom(
        1, kv_heads, blocks, dim, BLOCK, torch.float32, slots, landmark_tokens=landmark_tokens
    )
    policy.allocate(room, rotary(dim))
    return policy


@pytest.mark.parametrize("landmark_tokens", [8, 4])
def test_landmarks_spread_and_scores_equal_their_definitions(landmark_tokens: int) -> None:
    torch.manual_seed(0)
    kv_heads, group, dim, blocks, slots = 2, 3, 8, 6, 6  # one outlier per head
    per = BLOCK // landmark_tokens  # landmarks per block
    policy = shadowkv(kv_heads, dim, blocks, slots, landmark_tokens)
    keys = torch.randn(kv_heads, blocks, BLOCK, dim)
    policy.summarize(0, 0, keys[:, :4])
    policy.summarize(0, 4, keys[:, 4:])  # summaries arrive in pieces, as blocks retire
    q = torch.randn(kv_heads, group, dim)
    chunks = keys.view(kv_heads, blocks * per, landmark_tokens, dim)
    landmarks = chunks.mean(dim=2)
    torch.testing.assert_close(policy.landmarks[0], landmarks)
    expected = torch.zeros(kv_heads, blocks)
    for h in range(kv_heads):
        probs = torch.softmax(q[h] @ landmarks[h].T / dim**0.5, dim=-1)  # [group, chunks]
        best = probs.max(dim=0).values.view(blocks, per)
        for b in range(blocks):
            expected[h, b] = best[b].max()
            cos = [
                torch.nn.functional.cosine_similarity(key, landmarks[h, per * b + c], dim=0)
                for c in range(per) for key in chunks[h, per * b + c]
            ]  # fmt: skip
            assert float(policy.spread[0, h, b]) == pytest.approx(1 - min(cos).item(), abs=1e-6)
        outlier = int(policy.spread[0, h].argmax())
        expected[h, outlier] = 2.0  # always picked
    torch.testing.assert_close(policy.scores(0, q, blocks), expected)
    assert policy.outliers[0] is not None
    assert policy.outliers[0].tolist() == [[int(policy.spread[0, h].argmax())] for h in (0, 1)]


def test_scores_past_the_live_count_are_minus_infinity() -> None:
    """With a device count `live`, the chunks past it take no probability and their blocks
    score -inf: the scores of the live blocks equal those over `live` blocks alone."""
    torch.manual_seed(3)
    kv_heads, dim, blocks = 2, 8, 6
    policy = shadowkv(kv_heads, dim, blocks + 3, slots=8)
    policy.summarize(0, 0, torch.randn(kv_heads, blocks, BLOCK, dim))
    q = torch.randn(kv_heads, 2, dim)
    alone = policy.scores(0, q, blocks)
    outliers = policy.outliers[0]
    masked = policy.scores(0, q, blocks + 3, live=torch.tensor(blocks))
    torch.testing.assert_close(masked[:, :blocks], alone)
    assert torch.isneginf(masked[:, blocks:]).all()
    assert outliers is not None and policy.outliers[0] is not None
    assert policy.outliers[0].tolist() == outliers.tolist()


def test_rebuilt_keys_equal_the_keys_when_their_rank_fits() -> None:
    """Two heads of 128 dims (256 > RANK columns), keys of rank 100: the basis fitted to
    the prompt keeps them whole, so rebuilt keys equal the real ones, also for a block that
    retires after the fit (projected on the same basis); outliers' keys are exact, from
    the policy's own copy on the GPU, and no key comes from the host."""
    torch.manual_seed(1)
    kv_heads, dim, blocks, rank = 2, 128, 10, 100
    assert kv_heads * dim > RANK > rank
    policy = shadowkv(kv_heads, dim, blocks, slots=6)
    mix = torch.randn(rank, kv_heads * dim)
    pre = (torch.randn(blocks * BLOCK, rank) @ mix).view(blocks, BLOCK, kv_heads, dim)
    keys = rotate(policy.rope, pre.permute(2, 0, 1, 3))  # type: ignore[arg-type]
    policy.summarize(0, 0, keys[:, :9])
    assert policy.wants_all_keys(0)
    policy.take_all_keys(0, keys[:, :9])
    assert not policy.wants_all_keys(0)
    policy.summarize(0, 9, keys[:, 9:])
    policy.scores(0, torch.randn(kv_heads, 1, dim), blocks)
    outliers = policy.outliers[0].tolist()  # one per head
    picks = torch.tensor([[9, outliers[0][0], 4], [2, 9, outliers[1][0]]])
    got = policy.rebuilt_keys(0, picks)
    assert got is not None  # every key made on the GPU: none from the host
    expected = torch.stack([keys[h, picks[h]] for h in range(kv_heads)])
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)
    assert torch.equal(got[0, 1], keys[0, outliers[0][0]])  # exact, not rebuilt
    assert torch.equal(got[1, 2], keys[1, outliers[1][0]])


def test_outliers_keep_their_exact_keys_as_blocks_retire() -> None:
    """Blocks summarized in pieces: the outliers are the top spreads among every block so
    far (as a top-k over all of them), and each outlier's kept keys are its own."""
    torch.manual_seed(0)
    kv_heads, dim, blocks = 2, 8, 40
    policy = shadowkv(kv_heads, dim, blocks, slots=32)  # 6 outliers
    keys = torch.randn(kv_heads, blocks, BLOCK, dim)
    for first, end in ((0, 1), (1, 3), (3, 10), (10, 11), (11, 40)):
        policy.summarize(0, first, keys[:, first:end])
        top = torch.topk(policy.spread[0][:, :end], min(6, end)).indices
        kept = policy.outliers[0]
        for h in range(kv_heads):
            assert set(kept[h].tolist()) == set(top[h].tolist())
            for i, block in enumerate(kept[h].tolist()):
                assert torch.equal(policy.outlier_keys[0][h, i], keys[h, block])


def test_full_budget_equals_full_attention(recall_folder: Path) -> None:
    llm = recall_llm(recall_folder)
    full = tokens(llm, [PROMPT], [SamplingParams(**GREEDY)])
    params = SamplingParams(kv_policy="shadowkv", kv_budget=10**6, **GREEDY)
    assert tokens(llm, [PROMPT], [params]) == full
    assert_recall_idle(llm)


def test_rebuilt_keys_decode_as_fetched_keys(
    recall_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny model's keys have 2 x 16 columns, under RANK: rebuilding them loses
    nothing, so a small budget decodes the same tokens as fetching every key exact."""
    llm = recall_llm(recall_folder)
    params = SamplingParams(kv_policy="shadowkv", kv_budget=40, **GREEDY)
    rebuilt = tokens(llm, [PROMPT], [params])
    stats = llm.stats()
    assert stats["recall_blocks_attended_per_step"] == 10
    assert_recall_idle(llm)
    monkeypatch.setattr(ShadowKVPolicy, "rebuilt_keys", lambda self, layer, blocks: None)
    monkeypatch.setattr(ShadowKVPolicy, "needs_host_keys", lambda self: True)  # kept on host
    fetched = tokens(llm, [PROMPT], [params])
    assert fetched == rebuilt
    more = llm.stats()["recall_bytes_fetched"] - stats["recall_bytes_fetched"]
    assert more > stats["recall_bytes_fetched"]  # keys moved too


def test_the_basis_is_fitted_by_the_prefill(recall_folder: Path) -> None:
    """The prompt's last chunk fits every sparse layer's basis (streaming its keys once), so
    the first decode step only selects; the host store then holds only the sequence's
    values: its key slots went back, those of its full prompt blocks to the cache of
    published blocks (a later request with the prompt reuses them), the others free."""
    llm = recall_llm(recall_folder)
    engine = llm.engine
    request_id, seq = prefilled(llm, SamplingParams(kv_policy="shadowkv", kv_budget=40, **GREEDY))
    policy = seq.recall.state.policy
    assert isinstance(policy, ShadowKVPolicy)
    assert policy.fitted == [True] * 2  # 4 layers, 2 dense
    state, store = seq.recall.state, llm.engine.parts.recall.store  # type: ignore[union-attr]
    blocks = seq.recall.host_blocks
    assert state.key_slots == [] and len(state.value_slots) == blocks
    assert store.owned(request_id) == state.value_slots
    assert store.num_cached == len(PROMPT) // 4  # blocks of 4 tokens (recall_llm)
    assert store.num_free == store.num_slots - blocks - store.num_cached
    assert llm.stats()["recall_host_bytes_used"] == blocks * store.bytes_per_slot
    llm.check_integrity()
    engine.abort(request_id)
    assert_recall_idle(llm)


def test_landmark_tokens_must_be_a_power_of_two(recall_folder: Path) -> None:
    with pytest.raises(ValueError, match="kv_recall_landmark_tokens"):
        recall_llm(recall_folder, kv_recall_landmark_tokens=6)


@pytest.mark.parametrize("name", ["quest", "shadowkv"])
def test_summaries_of_every_layer_at_once_equal_layer_by_layer(name: str) -> None:
    """summarize_layers (a retiring step's blocks of all sparse layers, one set of kernels)
    leaves every summary as summarize does layer by layer: landmarks, spread, outliers and
    their keys, factors of fitted layers (quest: min and max)."""
    from strata.kv.recall.quest import QuestPolicy

    torch.manual_seed(4)
    layers, kv_heads, dim, blocks = 3, 2, 8, 12
    keys = torch.randn(layers, kv_heads, blocks, BLOCK, dim)
    room = SummaryRoom(layers, kv_heads, blocks, dim, BLOCK, torch.float32, 6)
    made = []
    for _ in range(2):
        policy = ShadowKVPolicy() if name == "shadowkv" else QuestPolicy()
        policy.allocate(room, rotary(dim))
        if isinstance(policy, ShadowKVPolicy):
            for layer in (0, 2):  # layer 1 is not fitted yet: no factors
                policy.take_all_keys(layer, keys[layer, :, :4])
        made.append(policy)
    one, every = made
    for first, end in ((4, 7), (7, 8), (8, 12)):  # retiring steps, as blocks leave the tails
        for layer in range(layers):
            one.summarize(layer, first, keys[layer, :, first:end])
        every.summarize_layers(slice(0, layers), first, keys[:, :, first:end])
    names = ("landmarks", "spread", "factors", "outliers", "outlier_keys")
    for attr in names if name == "shadowkv" else ("kmin", "kmax"):
        assert torch.equal(getattr(one, attr), getattr(every, attr)), attr
