"""pqcache (strata/kv/recall/pqcache.py): product-quantised keys rank tokens; a step
attends the blocks of the top tokens.

Exact where it must be: codebooks equal k-means of the prompt's sub-vectors, codes the
nearest codeword (also for blocks coded after the fit, and with fewer codewords than
CODEWORDS for short prompts); scores equal the softmax of q . the reconstructed keys,
maximised over the group and the block, for one sequence and a page's rows; at full
budget the engine decodes full attention's tokens, and at a small budget it attends the
budget, the page's fixed-shape decode equals the growing one, and nothing leaks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from strata import SamplingParams
from strata.kv.recall.buffers import Buffers, OwnBuffers
from strata.kv.recall.kmeans import kmeans
from strata.kv.recall.policy import TIE, SummaryRoom
from strata.kv.recall.pqcache import CODEWORDS, ITERATIONS, SEED, SUBSPACES, PQCachePolicy
from tests.test_recall import GREEDY, PROMPT, assert_recall_idle, prefilled, recall_llm, tokens

BLOCK = 16


def room(layers: int, kv_heads: int, dim: int, blocks: int) -> SummaryRoom:
    return SummaryRoom(layers, kv_heads, blocks, dim, BLOCK, torch.float32, slots=4)


def pqcache(kv_heads: int, dim: int, blocks: int, layers: int = 1, rows: int = 0) -> PQCachePolicy:
    policy = PQCachePolicy()
    policy.allocate(room(layers, kv_heads, dim, blocks), None, OwnBuffers(None, rows))
    return policy


def split(keys: torch.Tensor) -> torch.Tensor:
    """Keys [kv_heads, n, BLOCK, dim] -> sub-vectors [kv_heads, SUBSPACES, n * BLOCK, sub]."""
    kvh, n, bs, d = keys.shape
    flat = keys.reshape(kvh, n * bs, d)
    sub = d // SUBSPACES
    return torch.stack([flat[..., s * sub : (s + 1) * sub] for s in range(SUBSPACES)], dim=1)


def nearest_codes(keys: torch.Tensor, codebooks: torch.Tensor, k: int) -> torch.Tensor:
    """[kv_heads, n * BLOCK, SUBSPACES]: per token and subspace, the argmin of the squared
    distance to the first k codewords, one point at a time."""
    points = split(keys)
    kvh, subspaces, tokens, _ = points.shape
    codes = torch.zeros(kvh, tokens, subspaces, dtype=torch.long)
    for h in range(kvh):
        for s in range(subspaces):
            for t in range(tokens):
                distance = ((points[h, s, t] - codebooks[h, s, :k]) ** 2).sum(-1)
                codes[h, t, s] = int(distance.argmin())
    return codes


def reconstructed(policy: PQCachePolicy, layer: int, tokens: int) -> torch.Tensor:
    """[kv_heads, tokens, dim]: each token's codewords side by side."""
    codes, codebooks = policy.codes[layer][:, :tokens].long(), policy.codebooks[layer]
    kvh = codes.shape[0]
    parts = [
        torch.stack([codebooks[h, s, codes[h, :, s]] for h in range(kvh)])
        for s in range(SUBSPACES)
    ]  # fmt: skip
    return torch.cat(parts, dim=-1)


def expected_scores(
    keys: torch.Tensor, q: torch.Tensor, live: int, blocks: int, mass: bool = False
) -> torch.Tensor:
    """[kv_heads, blocks]: per head, softmax over the live tokens of q . keys [kv_heads,
    tokens, dim] / sqrt(dim), the max over the group, then each block's max (or, with
    `mass`, sum) over its tokens, block b's scaled by 1 - TIE * b (ties to the earlier
    block); -inf past live."""
    kvh, _, dim = q.shape
    out = torch.full((kvh, blocks), float("-inf"))
    for h in range(kvh):
        probs = torch.softmax(q[h] @ keys[h, : live * BLOCK].T / dim**0.5, dim=-1)
        per_token = probs.amax(dim=0).view(live, BLOCK)
        best = per_token.sum(dim=-1) if mass else per_token.amax(dim=-1)
        out[h, :live] = best * (1 - TIE * torch.arange(live, dtype=torch.float32))
    return out


def test_codebooks_are_kmeans_and_codes_the_nearest_codewords() -> None:
    """Nothing is recorded before the fit; the fit's codebooks are k-means of each head's
    and subspace's sub-vectors (same seed); every code, of the fitted blocks and of the
    blocks coded after, is its sub-vector's nearest codeword."""
    torch.manual_seed(0)
    kv_heads, dim, blocks = 2, 8, 10
    policy = pqcache(kv_heads, dim, blocks)
    keys = torch.randn(kv_heads, blocks, BLOCK, dim)
    policy.summarize(0, 0, keys[:, :6])  # before the fit: nothing
    assert policy.wants_all_keys(0) and policy.needs_host_keys()
    assert not policy.codes.any() and not policy.codebooks.any()
    policy.take_all_keys(0, keys[:, :6])
    assert not policy.wants_all_keys(0) and policy.needs_host_keys()
    fit = kmeans(split(keys[:, :6]), CODEWORDS, ITERATIONS, SEED, "l2")
    assert torch.equal(policy.codebooks[0], fit.centroids)
    for first, end in ((6, 7), (7, 10)):  # blocks retire after the fit
        policy.summarize(0, first, keys[:, first:end])
    codes = nearest_codes(keys, policy.codebooks[0], CODEWORDS)
    assert torch.equal(policy.codes[0].long(), codes)
    assert policy.codes.dtype == torch.uint8


def test_short_prompts_fit_fewer_codewords() -> None:
    """Two blocks of 16 tokens: 32 codewords (every sub-vector its own), the others zero
    and never a code, even for keys nearer zero than to any codeword."""
    torch.manual_seed(1)
    kv_heads, dim, blocks = 2, 8, 4
    policy = pqcache(kv_heads, dim, blocks)
    keys = torch.randn(kv_heads, blocks, BLOCK, dim) + 5
    keys[:, 2:] = torch.randn(kv_heads, 2, BLOCK, dim) * 1e-3  # near the zero rows
    policy.take_all_keys(0, keys[:, :2])
    k = 2 * BLOCK
    assert policy.codewords == [k]
    fit = kmeans(split(keys[:, :2]), k, ITERATIONS, SEED, "l2")
    assert torch.equal(policy.codebooks[0][:, :, :k], fit.centroids)
    assert not policy.codebooks[0][:, :, k:].any()
    policy.summarize(0, 2, keys[:, 2:])
    assert torch.equal(policy.codes[0].long(), nearest_codes(keys, policy.codebooks[0], k))
    assert int(policy.codes.max()) < k


def test_every_layer_at_once_equals_layer_by_layer() -> None:
    """summarize_layers over layers fitted with different codebook sizes and one not
    fitted (it records nothing) leaves the codes summarize leaves layer by layer."""
    torch.manual_seed(2)
    layers, kv_heads, dim, blocks = 3, 2, 8, 12
    keys = torch.randn(layers, kv_heads, blocks, BLOCK, dim)
    made = []
    for _ in range(2):
        policy = pqcache(kv_heads, dim, blocks, layers)
        policy.take_all_keys(0, keys[0, :, :4])  # 64 codewords
        policy.take_all_keys(2, keys[2, :, :2])  # 32
        made.append(policy)
    one, every = made
    for first, end in ((4, 7), (7, 8), (8, 12)):
        for layer in range(layers):
            one.summarize(layer, first, keys[layer, :, first:end])
        every.summarize_layers(slice(0, layers), first, keys[:, :, first:end])
    assert torch.equal(one.codes, every.codes) and torch.equal(one.codebooks, every.codebooks)
    assert not every.codes[1].any()
    for layer in (0, 2):  # layers of one size at once too
        alone = pqcache(kv_heads, dim, blocks, layers)
        alone.take_all_keys(layer, keys[layer, :, :4])
        alone.summarize_layers(slice(layer, layer + 1), 4, keys[layer : layer + 1, :, 4:])
        codes = nearest_codes(keys[layer], alone.codebooks[layer], CODEWORDS)
        assert torch.equal(alone.codes[layer].long(), codes)


@pytest.mark.parametrize("mass", [False, True])
@pytest.mark.parametrize("live", [None, 5])
def test_scores_are_the_softmax_of_q_dot_reconstructed_keys(live: int | None, mass: bool) -> None:
    torch.manual_seed(3)
    kv_heads, group, dim, blocks = 2, 3, 8, 8
    policy = pqcache(kv_heads, dim, blocks)
    policy.block_mass = mass
    keys = torch.randn(kv_heads, blocks, BLOCK, dim)
    policy.take_all_keys(0, keys[:, :6])
    policy.summarize(0, 6, keys[:, 6:])
    q = torch.randn(kv_heads, group, dim)
    count = None if live is None else torch.tensor(live)
    got = policy.scores(0, q, blocks, live=count)
    approx = reconstructed(policy, 0, blocks * BLOCK)
    torch.testing.assert_close(got, expected_scores(approx, q, live or blocks, blocks, mass))


def test_a_page_scores_its_rows_as_each_sequence_alone() -> None:
    """A page's policy (every buffer with a rows dimension) holding two sequences'
    summaries scores q [rows, kv_heads, group, dim] as each sequence's own policy, past
    each row's live count."""
    torch.manual_seed(4)
    rows, kv_heads, group, dim, blocks = 2, 2, 2, 8, 7
    page = pqcache(kv_heads, dim, blocks, layers=2, rows=rows)
    page.for_page()
    assert page.fitted == [True, True]
    alone = []
    for r, fitted in enumerate((5, 2)):
        policy = pqcache(kv_heads, dim, blocks, layers=2)
        keys = torch.randn(kv_heads, blocks, BLOCK, dim)
        policy.take_all_keys(1, keys[:, :fitted])
        policy.summarize(1, fitted, keys[:, fitted:])
        page.codebooks[:, r], page.codes[:, r] = policy.codebooks, policy.codes
        alone.append(policy)
    q, live = torch.randn(rows, kv_heads, group, dim), torch.tensor([7, 4])
    got = page.scores(1, q, blocks, live=live)
    for r, policy in enumerate(alone):
        torch.testing.assert_close(got[r], policy.scores(1, q[r], blocks, live=live[r]))
    assert torch.isneginf(got[1, :, 4:]).all() and torch.isfinite(got[1, :, :4]).all()


def test_the_top_blocks_hold_the_top_tokens() -> None:
    """Four blocks of 16 tokens, every key its own codeword (64 tokens, 64 codewords): the
    approximate logits are exact. Scoring a block by its best token (block_mass off):
    head 0 of the group wants block 3 most, then block 2; head 1 wants block 1: blocks
    rank 3, 1, 2, 0. By default a block scores its tokens' summed shares."""
    dim, blocks = 4, 4
    policy = pqcache(1, dim, blocks)
    assert policy.block_mass
    policy.block_mass = False
    keys = torch.zeros(1, blocks, BLOCK, dim)
    keys[0, 3, 7] = torch.tensor([8.0, 0, 0, 0])
    keys[0, 1, 0] = torch.tensor([0, 0, 6.0, 0])
    keys[0, 2, 3] = torch.tensor([3.0, 0, 0, 0])
    policy.take_all_keys(0, keys)
    assert torch.equal(reconstructed(policy, 0, blocks * BLOCK), keys.view(1, -1, dim))
    q = torch.tensor([[[1.0, 0, 0, 0], [0, 0, 1.0, 0]]])
    scores = policy.scores(0, q, blocks)
    torch.testing.assert_close(scores, expected_scores(keys.view(1, -1, dim), q, blocks, blocks))
    assert torch.topk(scores[0], 3).indices.tolist() == [3, 1, 2]
    policy.block_mass = True
    mass = expected_scores(keys.view(1, -1, dim), q, blocks, blocks, mass=True)
    torch.testing.assert_close(policy.scores(0, q, blocks), mass)


def test_summary_bytes_are_what_allocate_takes() -> None:
    class Counted(Buffers):
        def __init__(self) -> None:
            self.bytes = 0

        def tensor(
            self, name: str, shape: tuple[int, ...], dtype: torch.dtype, layered: bool,
            fill: float = 0,
        ) -> torch.Tensor:  # fmt: skip
            assert name.startswith("pqcache.")
            made = torch.full(shape, fill, dtype=dtype)
            self.bytes += made.numel() * made.element_size()
            return made

    for dtype in (torch.float32, torch.bfloat16):
        space = SummaryRoom(3, 2, 13, 64, BLOCK, dtype, slots=4)
        counted = Counted()
        PQCachePolicy().allocate(space, None, counted)
        assert counted.bytes == PQCachePolicy.summary_bytes(space) > 0


def test_head_dim_must_split_into_the_subspaces() -> None:
    with pytest.raises(ValueError, match="head_dim 7 is not a multiple of 2"):
        pqcache(1, 7, 4)


# ---- the engine ------------------------------------------------------------------------------


def test_full_budget_equals_full_attention(recall_folder: Path) -> None:
    llm = recall_llm(recall_folder)
    full = tokens(llm, [PROMPT], [SamplingParams(**GREEDY)])
    params = SamplingParams(kv_policy="pqcache", kv_budget=10**6, **GREEDY)
    assert tokens(llm, [PROMPT], [params]) == full
    assert_recall_idle(llm)


def test_the_codebooks_are_fitted_by_the_prefill(recall_folder: Path) -> None:
    """The prompt's last chunk fits every sparse layer's codebooks; the keys stay on the
    host (picked blocks fetch them exact); a small budget attends it and leaks nothing."""
    llm = recall_llm(recall_folder)
    engine = llm.engine
    _, seq = prefilled(llm, SamplingParams(kv_policy="pqcache", kv_budget=40, **GREEDY))
    state = seq.recall.state
    policy = state.policy
    assert isinstance(policy, PQCachePolicy)
    assert policy.fitted == [True] * 2 and policy.codewords == [CODEWORDS] * 2
    assert state.keys_on_host
    while engine.has_unfinished():
        engine.step()
    stats = llm.stats()
    assert stats["recall_blocks_attended_per_step"] == 10
    assert 0 < stats["recall_working_set_hit_rate"] <= 1
    assert_recall_idle(llm)


def test_a_reused_prefix_decodes_as_alone(recall_folder: Path) -> None:
    """A request over a published prefix (its blocks summarized from the store before any
    fit, prefix_copy.py) fits its codebooks at its prompt's end and gives the tokens it
    gives on an engine that shares nothing."""
    params = SamplingParams(kv_policy="pqcache", kv_budget=40, **GREEDY)
    first, second = [*PROMPT[:120], *range(7, 14)], [*PROMPT[:120], *range(21, 32)]
    alone = recall_llm(recall_folder, enable_prefix_caching=False)
    want = tokens(alone, [first, second], [params] * 2)
    llm = recall_llm(recall_folder)
    assert tokens(llm, [first], [params]) == want[:1]
    out = llm.generate([second], params)[0]
    assert out.token_ids == want[1] and out.num_cached_tokens == 120
    assert_recall_idle(llm)


def test_the_budget_defaults_to_pqcaches_ten_percent(recall_folder: Path) -> None:
    """A pqcache request naming no budget, on an engine that gives none, attends 10% of
    its prompt (PQCache's default): 150 prompt tokens -> 15 -> 3 blocks of 4 a step."""
    llm = recall_llm(recall_folder, kv_policy="pqcache")
    out = tokens(llm, [PROMPT], [SamplingParams(**GREEDY)])
    assert len(out[0]) == GREEDY["max_tokens"]
    assert llm.stats()["recall_blocks_attended_per_step"] == 3
    assert_recall_idle(llm)
