"""clusterkv (strata/kv/recall/clusterkv.py): semantic clusters of keys, recalled by block.

Exact where it must be: the prompt's clusters are a direct k-means of its keys; scores
equal their definition (softmax over the live clusters, max over the GQA group, a
token's cluster, a block's best token), for one sequence and a page's rows; the top
blocks are whole clusters in order of score; retiring blocks are labelled with their
nearest centroid until their window fills, then clustered on their own; summaries of
several layers at once equal layer by layer; summary_bytes is what allocate takes; the
engine at full budget gives full attention's tokens, and at a small budget attends the
budget, decodes through its page as through the growing path, and leaks nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from strata import SamplingParams
from strata.kv.recall import clusterkv as module
from strata.kv.recall.buffers import Buffers, OwnBuffers
from strata.kv.recall.clusterkv import (
    CLUSTERS,
    ITERATIONS,
    SEED,
    WINDOW_CLUSTERS,
    ClusterKVPolicy,
    Progress,
)
from strata.kv.recall.kmeans import kmeans, nearest
from strata.kv.recall.page import RecallPage
from strata.kv.recall.policy import TIE, SummaryRoom
from tests.test_recall import (
    BLOCK,
    GREEDY,
    PROMPT,
    assert_fixed_equals_growing,
    assert_recall_idle,
    prefilled,
    recall_llm,
    tokens,
)

BUFFERS = ("centroids", "labels", "clusters", "window")


def room(kv_heads: int, dim: int, blocks: int, layers: int = 1) -> SummaryRoom:
    return SummaryRoom(layers, kv_heads, blocks, dim, BLOCK, torch.float32, 4)


def clusterkv(
    kv_heads: int, dim: int, blocks: int, layers: int = 1, buffers: Buffers | None = None
) -> ClusterKVPolicy:
    policy = ClusterKVPolicy()
    policy.allocate(room(kv_heads, dim, blocks, layers), None, buffers)
    return policy


def direct_scores(
    q: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor, blocks: int,
    mass: bool = False,
) -> torch.Tensor:  # fmt: skip
    """[kv_heads, blocks]: per head, each query head's softmax over the clusters
    (centroids [kv_heads, live, dim]), the group's max, a token's cluster's, a block's
    best token (or, with `mass`, the sum over its tokens; labels [kv_heads, tokens]),
    block b's scaled by 1 - TIE * b."""
    kv_heads, _, dim = q.shape
    out = torch.empty(kv_heads, blocks)
    for h in range(kv_heads):
        share = torch.softmax(q[h] @ centroids[h].T / dim**0.5, dim=-1).amax(dim=0)
        for b in range(blocks):
            tokens_ = [share[int(c)] for c in labels[h, b * BLOCK : (b + 1) * BLOCK]]
            out[h, b] = (sum(tokens_) if mass else max(tokens_)) * (1 - TIE * b)
    return out


# ---- the parts ------------------------------------------------------------------------------


@pytest.mark.parametrize("blocks", [60, 3])  # 240 tokens: CLUSTERS clusters; 12: one a token
def test_the_prompt_clusters_are_a_direct_kmeans(blocks: int) -> None:
    torch.manual_seed(0)
    kv_heads, dim = 2, 8
    policy = clusterkv(kv_heads, dim, blocks + 5)
    keys = torch.randn(kv_heads, blocks, BLOCK, dim)
    policy.summarize(0, 0, keys)  # not fitted yet: records nothing
    assert policy.wants_all_keys(0) and policy.fitted == [False]
    assert int(policy.clusters[0]) == 0 and not policy.labels.any()
    policy.take_all_keys(0, keys)
    tokens_ = blocks * BLOCK
    k = min(CLUSTERS, tokens_)
    fit = kmeans(keys.reshape(kv_heads, tokens_, dim), k, ITERATIONS, SEED, "cosine")
    assert torch.equal(policy.centroids[0, :, :k], fit.centroids)
    assert torch.equal(policy.labels[0, :, :tokens_], fit.labels.int())
    assert int(policy.clusters[0]) == k and policy.progress[0] == Progress(blocks, blocks, k)
    assert not policy.wants_all_keys(0) and policy.needs_host_keys()  # exact keys: fetched
    assert int(policy.labels.min()) >= 0 and int(policy.labels.max()) < k
    if k == tokens_:  # capped: a cluster for each token
        for h in range(kv_heads):
            assert sorted(policy.labels[0, h, :tokens_].tolist()) == list(range(k))


@pytest.mark.parametrize("mass", [False, True])
def test_scores_equal_their_definition_for_a_sequence_and_a_page(
    monkeypatch: pytest.MonkeyPatch, mass: bool
) -> None:
    """Two sequences on rows of a page (one with fewer tokens than CLUSTERS: fewer
    clusters), and the page's own instance scoring both rows at once past each row's
    live count, as page_decode.py does."""
    monkeypatch.setattr(module, "CLUSTERS", 6)
    monkeypatch.setattr(ClusterKVPolicy, "block_mass", mass)
    torch.manual_seed(1)
    kv_heads, group, dim, blocks = 2, 3, 8, 12
    page = RecallPage(("clusterkv", 4, blocks), 2, 0, torch.device("cpu"), None)
    lengths = (10, 1)  # middle blocks of each row: 6 clusters, and 4 (one a token)
    rows = []
    for r, n in enumerate(lengths):
        policy = clusterkv(kv_heads, dim, blocks, buffers=page.take(r, f"seq{r}"))
        policy.take_all_keys(0, torch.randn(kv_heads, n, BLOCK, dim))
        rows.append(policy)
    assert [int(p.clusters[0]) for p in rows] == [6, 4]
    whole = clusterkv(kv_heads, dim, blocks, buffers=page.whole())
    whole.for_page()
    assert whole.fitted == [True] and not whole.wants_all_keys(0)
    q = torch.randn(2, kv_heads, group, dim)
    paged = whole.scores(0, q, blocks, live=torch.tensor(lengths))
    assert paged.shape == (2, kv_heads, blocks)
    for r, (policy, n) in enumerate(zip(rows, lengths, strict=True)):
        k = int(policy.clusters[0])
        want = direct_scores(q[r], policy.centroids[0, :, :k], policy.labels[0], n, mass)
        torch.testing.assert_close(policy.scores(0, q[r], n), want)
        torch.testing.assert_close(paged[r, :, :n], want)
        assert torch.isneginf(paged[r, :, n:]).all()
        alone = policy.scores(0, q[r], blocks, live=torch.tensor(n))  # a sequence's, fixed
        torch.testing.assert_close(alone[:, :n], want)
        assert torch.isneginf(alone[:, n:]).all()


def whole_clusters(labels: list[list[int]], order: list[int]) -> list[int]:
    """ClusterKV's pick in blocks, best first: the blocks holding tokens of each cluster
    in `order` in turn (earliest first), each block once."""
    taken: list[int] = []
    for c in order:
        taken += [b for b, held in enumerate(labels) if c in held and b not in taken]
    return taken


def test_the_top_blocks_are_whole_clusters_in_order_of_score(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Scoring a block by its best token (block_mass off), ClusterKV's pick: four
    clusters scripted along the axes, q scoring them 2 > 0 > 3 > 1: the top `budget`
    blocks are those of cluster 2, then 0, 3 and 1, until the budget is full; blocks of
    one cluster tie, and the earlier one goes first."""
    monkeypatch.setattr(ClusterKVPolicy, "block_mass", False)
    dim, blocks = 4, 6
    policy = clusterkv(1, dim, blocks)
    labels = [[1, 1, 1, 1], [0, 0, 3, 3], [2, 1, 1, 1], [3, 3, 3, 3], [0, 2, 0, 0], [1, 3, 1, 1]]
    policy.centroids[0, 0, :4] = torch.diag(torch.tensor([3.0, 1.0, 4.0, 2.0]))
    policy.labels[0, 0, : blocks * BLOCK] = torch.tensor(labels).flatten()
    policy.clusters[0].fill_(4)
    scores = policy.scores(0, torch.ones(1, 1, dim), blocks)[0]
    order = whole_clusters(labels, [2, 0, 3, 1])
    assert order == [2, 4, 1, 3, 5, 0]
    assert torch.topk(scores, blocks).indices.tolist() == order
    for budget in range(1, blocks + 1):
        picks = torch.topk(scores, budget, sorted=False).indices.tolist()
        assert sorted(picks) == sorted(order[:budget]), budget


def test_the_top_blocks_hold_the_most_attention_by_centroid() -> None:
    """By default a block scores the sum of its tokens' cluster shares: block 4 (three
    tokens of cluster 0, one of the best cluster 2) outranks block 2 (one of cluster 2,
    three of the worst cluster 1), which the best-token rule put first."""
    dim, blocks = 4, 6
    policy = clusterkv(1, dim, blocks)
    assert policy.block_mass
    labels = [[1, 1, 1, 1], [0, 0, 3, 3], [2, 1, 1, 1], [3, 3, 3, 3], [0, 2, 0, 0], [1, 3, 1, 1]]
    policy.centroids[0, 0, :4] = torch.diag(torch.tensor([3.0, 1.0, 4.0, 2.0]))
    policy.labels[0, 0, : blocks * BLOCK] = torch.tensor(labels).flatten()
    policy.clusters[0].fill_(4)
    scores = policy.scores(0, torch.ones(1, 1, dim), blocks)[0]
    share = torch.softmax(torch.tensor([3.0, 1.0, 4.0, 2.0]) / dim**0.5, dim=0)
    mass = torch.stack([share[torch.tensor(row)].sum() for row in labels])
    torch.testing.assert_close(scores, mass * (1 - TIE * torch.arange(blocks)))
    assert torch.topk(scores, blocks).indices.tolist() == [4, 1, 2, 3, 5, 0]


def test_ties_go_to_the_earlier_block_whatever_the_shape() -> None:
    """Every token in one cluster: every block ties on its share, and the scaling by
    1 - TIE * index orders them earliest first, alike over `live` blocks of a fixed
    shape and over those blocks alone."""
    torch.manual_seed(5)
    blocks = 300
    policy = clusterkv(1, 8, blocks + 100)
    policy.clusters[0].fill_(1)
    policy.centroids[0, 0, 0] = torch.randn(8)
    q = torch.randn(1, 2, 8)
    alone = policy.scores(0, q, blocks)[0]
    fixed = policy.scores(0, q, blocks + 100, live=torch.tensor(blocks))[0]
    assert torch.equal(fixed[:blocks], alone) and torch.isneginf(fixed[blocks:]).all()
    assert bool((alone[1:] < alone[:-1]).all()) and float(alone[0]) == BLOCK  # all share 1
    assert torch.topk(fixed, 40, sorted=False).indices.sort().values.tolist() == list(range(40))


def test_retiring_blocks_are_labelled_nearest_then_clustered_by_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Windows of 3 blocks: a retiring block takes its nearest centroid's label; the
    window's third block adds WINDOW_CLUSTERS clusters fitted to the window's keys (a
    direct k-means) and relabels exactly its tokens; four blocks at once close the next
    window and open another."""
    monkeypatch.setattr(module, "CLUSTERS", 5)
    monkeypatch.setattr(module, "WINDOW_TOKENS", 3 * BLOCK)
    torch.manual_seed(2)
    kv_heads, dim = 2, 8
    policy = clusterkv(kv_heads, dim, 20)
    assert policy.centroids.shape[2] == 5 + WINDOW_CLUSTERS * 7  # ceil(20 / 3) windows
    keys = torch.randn(kv_heads, 11, BLOCK, dim)
    span = lambda a, b: policy.labels[0][:, a * BLOCK : b * BLOCK]  # noqa: E731
    points = lambda a, b: keys[:, a:b].reshape(kv_heads, -1, dim)  # noqa: E731
    policy.take_all_keys(0, keys[:, :4])
    prompt, prompt_centroids = span(0, 4).clone(), policy.centroids[0, :, :5].clone()
    for b in (4, 5):  # provisional: the nearest of the prompt's 5
        policy.summarize(0, b, keys[:, b : b + 1])
        want = nearest(points(b, b + 1), prompt_centroids, "cosine").int()
        assert torch.equal(span(b, b + 1), want) and int(policy.clusters[0]) == 5
    policy.summarize(0, 6, keys[:, 6:7])  # the window of blocks 4..6 closes
    fit = kmeans(points(4, 7), WINDOW_CLUSTERS, ITERATIONS, SEED, "cosine")
    assert int(policy.clusters[0]) == 5 + WINDOW_CLUSTERS
    assert torch.equal(policy.centroids[0, :, 5 : 5 + WINDOW_CLUSTERS], fit.centroids)
    assert torch.equal(span(4, 7), fit.labels.int() + 5)
    assert torch.equal(span(0, 4), prompt)
    assert torch.equal(policy.centroids[0, :, :5], prompt_centroids)
    policy.summarize(0, 7, keys[:, 7:11])  # closes 7..9, opens 10
    fit = kmeans(points(7, 10), WINDOW_CLUSTERS, ITERATIONS, SEED, "cosine")
    live = 5 + 2 * WINDOW_CLUSTERS
    assert int(policy.clusters[0]) == live
    assert torch.equal(span(7, 10), fit.labels.int() + 5 + WINDOW_CLUSTERS)
    want = nearest(points(10, 11), policy.centroids[0, :, :live], "cosine").int()
    assert torch.equal(span(10, 11), want)
    assert policy.progress[0] == Progress(11, 10, live)


def test_summaries_of_every_layer_at_once_equal_layer_by_layer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three layers at different points (fitted at 4 blocks, not fitted, fitted at 6):
    summarize_layers as blocks retire leaves every buffer as summarize layer by layer,
    windows closing on the way; blocks summarized again change nothing, a gap is an
    error."""
    monkeypatch.setattr(module, "CLUSTERS", 5)
    monkeypatch.setattr(module, "WINDOW_TOKENS", 2 * BLOCK)
    torch.manual_seed(4)
    layers, kv_heads, dim, blocks = 3, 2, 8, 14
    keys = torch.randn(layers, kv_heads, blocks, BLOCK, dim)
    made = []
    for _ in range(2):
        policy = clusterkv(kv_heads, dim, blocks, layers)
        policy.take_all_keys(0, keys[0, :, :4])
        policy.take_all_keys(2, keys[2, :, :6])
        made.append(policy)
    one, every = made
    for first, end in ((4, 5), (5, 8), (8, 9), (9, 12)):
        for layer in range(layers):
            one.summarize(layer, first, keys[layer, :, first:end])
        every.summarize_layers(slice(0, layers), first, keys[:, :, first:end])
    for name in BUFFERS:
        assert torch.equal(getattr(one, name), getattr(every, name)), name
    windows = (4, 0, 3)  # closed in layers 0, 1 (not fitted) and 2
    assert every.progress == one.progress == [
        Progress(12, 12, 5 + w * WINDOW_CLUSTERS) if w else Progress() for w in windows
    ]
    before = {name: getattr(every, name).clone() for name in BUFFERS}
    every.summarize_layers(slice(0, layers), 10, keys[:, :, 10:12])
    for name in BUFFERS:
        assert torch.equal(getattr(every, name), before[name]), name
    with pytest.raises(RuntimeError, match="middle block 13 after 12 labelled"):
        every.summarize(0, 13, keys[0, :, 13:14])


@pytest.mark.parametrize(("block_size", "blocks"), [(4, 50), (16, 7), (512, 3)])
def test_summary_bytes_are_what_allocate_takes(block_size: int, blocks: int) -> None:
    taken: dict[str, torch.Tensor] = {}

    class Recording(OwnBuffers):
        def tensor(self, name: str, *args: Any, **kw: Any) -> torch.Tensor:
            taken[name] = super().tensor(name, *args, **kw)
            return taken[name]

    summary = SummaryRoom(3, 2, blocks, 16, block_size, torch.bfloat16, 4)
    ClusterKVPolicy().allocate(summary, None, Recording(None))
    assert sorted(taken) == sorted(f"clusterkv.{name}" for name in BUFFERS)
    nbytes = sum(t.numel() * t.element_size() for t in taken.values())
    assert ClusterKVPolicy.summary_bytes(summary) == nbytes
    window = max(1, 320 // block_size)
    assert taken["clusterkv.centroids"].shape[2] == CLUSTERS + 8 * -(-blocks // window)
    ClusterKVPolicy().allocate(summary, None, Recording(None, rows=3))  # a page of 3 rows
    assert sum(t.numel() * t.element_size() for t in taken.values()) == 3 * nbytes


# ---- the engine -----------------------------------------------------------------------------


def test_full_budget_equals_full_attention(recall_folder: Path) -> None:
    llm = recall_llm(recall_folder)
    full = tokens(llm, [PROMPT], [SamplingParams(**GREEDY)])
    params = SamplingParams(kv_policy="clusterkv", kv_budget=10**6, **GREEDY)
    assert tokens(llm, [PROMPT], [params]) == full
    stats = llm.stats()
    assert stats["recall_decode_steps"] == GREEDY["max_tokens"] - 1
    assert stats["recall_bytes_fetched"] > 0
    assert_recall_idle(llm)


def test_the_prompt_is_clustered_by_the_prefill_and_the_budget_attended(
    recall_folder: Path,
) -> None:
    """Budget 40 tokens with blocks of 4: the prompt's last chunk clusters every sparse
    layer's 34 middle blocks (136 tokens: a cluster each, under CLUSTERS), the keys stay
    on the host, and each decode step attends 10 middle blocks per layer and head."""
    llm = recall_llm(recall_folder)
    _, seq = prefilled(llm, SamplingParams(kv_policy="clusterkv", kv_budget=40, **GREEDY))
    policy = seq.recall.state.policy
    assert isinstance(policy, ClusterKVPolicy)
    assert policy.fitted == [True] * 2  # 4 layers, 2 dense
    assert policy.clusters.tolist() == [136, 136]
    assert policy.progress == [Progress(34, 34, 136)] * 2
    assert seq.recall.state.keys_on_host
    while llm.engine.has_unfinished():
        llm.engine.step()
    stats = llm.stats()
    assert stats["recall_blocks_attended_per_step"] == 10
    assert 0 < stats["recall_working_set_hit_rate"] <= 1
    assert_recall_idle(llm)


def test_fixed_shape_decode_equals_the_growing_one(
    recall_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """16 prompt clusters and windows of 2 blocks, so clusters hold several tokens and
    windows close while decoding: decode steps through the page (scores over the whole
    room past device counts, blocks retiring for both sparse layers at once) give the
    tokens of the path that picks per sequence and retires layer by layer."""
    monkeypatch.setattr(module, "CLUSTERS", 16)
    monkeypatch.setattr(module, "WINDOW_TOKENS", 2 * BLOCK)
    windows = 0
    close = ClusterKVPolicy._close_window

    def counted_close(self: ClusterKVPolicy, layers: slice, p: Progress) -> Progress:
        nonlocal windows
        windows += layers.stop - layers.start
        return close(self, layers, p)

    monkeypatch.setattr(ClusterKVPolicy, "_close_window", counted_close)
    params = SamplingParams(kv_policy="clusterkv", kv_budget=40, **GREEDY)
    steps = assert_fixed_equals_growing(recall_folder, [PROMPT], params, monkeypatch)
    assert steps >= 2 * (GREEDY["max_tokens"] - 2)
    assert windows == 2 * 3 * 2  # each run: 6 blocks retire while decoding, 3 windows a layer


def test_a_reused_prefix_gives_the_tokens_of_the_request_alone(recall_folder: Path) -> None:
    """The second request reuses the first's published prompt blocks (their clusters
    are fitted at its own prompt's end, over keys read from the store) and decodes as
    it does alone."""
    from tests.test_recall_prefix import FIRST, SECOND, SHARED, alone, params

    sp = params("clusterkv")
    want = alone(recall_folder, SECOND, sp)
    llm = recall_llm(recall_folder)
    tokens(llm, [FIRST], [sp])
    assert tokens(llm, [SECOND], [sp]) == [want]
    assert llm.stats()["recall_prefix_blocks_reused"] == SHARED
    assert_recall_idle(llm)
