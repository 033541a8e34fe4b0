"""ClusterKV (Liu et al., DAC'25) on the recall store: keys grouped into semantic
clusters, recalled by cluster, fetched by block.

Per sparse layer, on the GPU (in a page each gets a rows dimension after the layer):

    centroids [kv_heads, max_clusters, dim]  each cluster's mean post-RoPE key (a float32
                                             mean, kept in room.dtype)
    labels    [kv_heads, max_blocks * block_size] int32  the cluster of each middle token
    clusters  []  int64   live clusters: 0 .. clusters-1 (a device count)
    window    [kv_heads, window_blocks * block_size, dim]  the open window's keys

Invariants: every token of a labelled middle block has a label below `clusters`;
centroids at or past it are stale and score -inf. The sink (block 0: SINK_BLOCKS blocks,
ClusterKV's 16 sink tokens at a block of 16) is never a middle block, never clustered.

Clustering is k-means by angle (kmeans.py, "cosine", seed SEED), per KV head:

    middle blocks | prompt: CLUSTERS | window: +WINDOW_CLUSTERS | ...  | open window   |
                  0           fitted at                       pending             blocks
                                                                 labels provisional

    prompt   at the layer's first selecting step (`take_all_keys`, every middle block so
             far): min(CLUSTERS, tokens) clusters
    open     each block retiring after it is labelled with its nearest centroid at once
             (so it can be picked the next step) and its keys go to `window`
    window   once window_blocks blocks (WINDOW_TOKENS tokens) are open, WINDOW_CLUSTERS
             new clusters are fitted to their keys and their tokens relabelled to them

A decode step scores each live cluster per query head as softmax(q . centroid /
sqrt(dim)) over the live clusters; the GQA group shares the max over its heads; a token
scores its cluster's share and a block the sum over its tokens (`block_mass`: the
block's share of the attention with every key taken as its centroid); blocks at or past
`live` score -inf. The budget then goes to the blocks that hold the most of the likely
clusters' tokens (measured by benchmarks/recall_selection_mass.py). With block_mass
off, a block scores its best token, and the top budget_blocks blocks are ClusterKV's
pick mapped onto blocks: whole clusters in order of score, each bringing every block
that holds one of its tokens (once), until the budget is full, the last cluster's blocks
partly: its earliest ones.

Blocks of the same clusters tie; ties go to the earlier block (policy.py's
prefer_earlier), as ClusterKV fills the budget with a cluster's first tokens.

The host store keeps every key (needs_host_keys): picked blocks are attended exactly,
keys and values fetched. Under tensor parallelism a rank clusters its own KV heads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from strata.attention.layer_inputs import Rotary
from strata.kv.recall.buffers import Buffers, OwnBuffers
from strata.kv.recall.kmeans import kmeans, nearest
from strata.kv.recall.policy import (
    RecallPolicy,
    SummaryRoom,
    block_probabilities,
    dead_blocks,
    per_block_score,
    prefer_earlier,
)

CLUSTERS = 200  # of the prompt, per KV head (capped at its tokens)
ITERATIONS = 20  # k-means rounds
WINDOW_TOKENS = 320  # decoded tokens clustered together (whole blocks, at least one)
WINDOW_CLUSTERS = 8  # clusters each such window adds
SEED = 0


def window_blocks(room: SummaryRoom) -> int:
    """Middle blocks a window of decoded tokens spans."""
    return max(1, WINDOW_TOKENS // room.block_size)


def max_clusters(room: SummaryRoom) -> int:
    """The prompt's clusters and every window's, for max_blocks middle blocks."""
    return CLUSTERS + WINDOW_CLUSTERS * -(-room.max_blocks // window_blocks(room))


@dataclass(frozen=True)
class Progress:
    """A fitted layer's clustering, in middle blocks: blocks 0..blocks-1 are labelled,
    those from `pending` on form the open window (provisional labels, their keys in
    `window`); `clusters` centroids live (the device count's value)."""

    blocks: int = 0
    pending: int = 0
    clusters: int = 0


class ClusterKVPolicy(RecallPolicy):
    name = "clusterkv"
    # a block's score: the sum of its tokens' shares, its estimated attention mass (True),
    # or its best token's share (False)
    block_mass = True

    def __init__(self) -> None:
        self.room: SummaryRoom | None = None
        self.fitted: list[bool] = []  # per sparse layer: its prompt clusters exist
        self.progress: list[Progress] = []  # per sparse layer, once fitted

    def allocate(
        self, room: SummaryRoom, rope: Rotary | None = None, buffers: Buffers | None = None
    ) -> None:
        buffers = buffers or OwnBuffers(room.device)
        self.room = room
        kvh, d, tokens = room.kv_heads, room.head_dim, room.max_blocks * room.block_size

        def layered(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return buffers.tensor(f"clusterkv.{name}", (room.layers, *shape), dtype, layered=True)

        self.centroids = layered("centroids", (kvh, max_clusters(room), d), room.dtype)
        self.labels = layered("labels", (kvh, tokens), torch.int32)
        self.clusters = layered("clusters", (), torch.long)
        window = window_blocks(room) * room.block_size
        self.window = layered("window", (kvh, window, d), room.dtype)
        self.fitted = [False] * room.layers
        self.progress = [Progress()] * room.layers

    def for_page(self) -> None:
        assert self.room is not None
        self.fitted = [True] * self.room.layers  # the page's rows are all fitted

    @staticmethod
    def summary_bytes(room: SummaryRoom) -> int:
        item, bs = room.dtype.itemsize, room.block_size
        vectors = max_clusters(room) + window_blocks(room) * bs  # centroids, window keys
        per_head = vectors * room.head_dim * item + room.max_blocks * bs * 4  # labels
        return room.layers * (room.kv_heads * per_head + 8)  # clusters: one int64

    # ---- summaries ------------------------------------------------------------------------------

    def wants_all_keys(self, layer: int) -> bool:
        return not self.fitted[layer]

    def take_all_keys(self, layer: int, keys: torch.Tensor) -> None:
        """The prompt's clusters: k-means of each KV head's keys of every middle block so
        far (keys [kv_heads, n, bs, dim]), min(CLUSTERS, n * bs) of them."""
        room = self.room
        assert room is not None
        kvh, n, bs, d = keys.shape
        k = min(CLUSTERS, n * bs)
        fit = kmeans(keys.reshape(kvh, n * bs, d), k, ITERATIONS, SEED, "cosine")
        self.centroids[layer][..., :k, :] = fit.centroids.to(room.dtype)
        self.labels[layer][..., : n * bs] = fit.labels.int()
        self.clusters[layer].fill_(k)
        self.fitted[layer] = True
        self.progress[layer] = Progress(n, n, k)

    def summarize(self, layer: int, first: int, keys: torch.Tensor) -> None:
        self.summarize_layers(slice(layer, layer + 1), first, keys[None])

    def summarize_layers(self, layers: slice, first: int, keys: torch.Tensor) -> None:
        """Label middle blocks first.. (keys [L, kv_heads, n, bs, dim]) of the fitted
        layers; a layer not fitted records nothing (its `take_all_keys` sees every block).
        Layers at one point of their clustering (as they are when blocks retire in step)
        are labelled, and their windows clustered, at once."""
        start = layers.start
        for run in self._runs(layers):
            if self.fitted[run.start]:
                self._extend(run, first, keys[run.start - start : run.stop - start])

    def _runs(self, layers: slice) -> list[slice]:
        """`layers` cut into runs of consecutive layers in one state."""
        runs, begin = [], layers.start
        for s in range(layers.start + 1, layers.stop):
            if (self.fitted[s], self.progress[s]) != (self.fitted[begin], self.progress[begin]):
                runs.append(slice(begin, s))
                begin = s
        return [*runs, slice(begin, layers.stop)]

    def _extend(self, layers: slice, first: int, keys: torch.Tensor) -> None:
        """Blocks first.. of fitted layers in one state: provisional labels, windows
        closed as they fill. Middle blocks retire once each, in order (sequence.py), so
        `first` is the layers' labelled count; blocks already labelled keep their labels."""
        room = self.room
        assert room is not None
        p = self.progress[layers.start]
        if first > p.blocks:
            raise RuntimeError(f"clusterkv: middle block {first} after {p.blocks} labelled")
        keys = keys[:, :, p.blocks - first :]
        while keys.shape[2] > 0:
            space = window_blocks(room) - (p.blocks - p.pending)  # the open window's
            p = self._label(layers, p, keys[:, :, :space])
            keys = keys[:, :, space:]
            if p.blocks - p.pending == window_blocks(room):
                p = self._close_window(layers, p)
        self.progress[layers] = [p] * (layers.stop - layers.start)

    def _label(self, layers: slice, p: Progress, keys: torch.Tensor) -> Progress:
        """Open-window blocks (keys [L, kv_heads, n, bs, dim]) get their nearest live
        centroid as label, and their keys go to the window."""
        num_layers, kvh, n, bs, d = keys.shape
        tokens = keys.reshape(num_layers, kvh, n * bs, d)
        live = self.centroids[layers][..., : p.clusters, :]
        span = slice(p.blocks * bs, (p.blocks + n) * bs)
        self.labels[layers][..., span] = nearest(tokens, live, "cosine").int()
        at = (p.blocks - p.pending) * bs
        self.window[layers][..., at : at + n * bs, :] = tokens
        return replace(p, blocks=p.blocks + n)

    def _close_window(self, layers: slice, p: Progress) -> Progress:
        """The full window's WINDOW_CLUSTERS clusters, after the live ones; its tokens
        are relabelled to them."""
        room = self.room
        assert room is not None
        bs, c = room.block_size, p.clusters
        fit = kmeans(self.window[layers], WINDOW_CLUSTERS, ITERATIONS, SEED, "cosine")
        self.centroids[layers][..., c : c + WINDOW_CLUSTERS, :] = fit.centroids.to(room.dtype)
        self.labels[layers][..., p.pending * bs : p.blocks * bs] = (fit.labels + c).int()
        self.clusters[layers].fill_(c + WINDOW_CLUSTERS)
        return Progress(p.blocks, p.blocks, c + WINDOW_CLUSTERS)

    # ---- a decode step --------------------------------------------------------------------------

    def scores(
        self, layer: int, q: torch.Tensor, num_blocks: int, live: torch.Tensor | None = None
    ) -> torch.Tensor:
        room = self.room
        assert room is not None
        bs = room.block_size
        centroids = self.centroids[layer]  # [..., kv_heads, max_clusters, dim]
        logits = q.to(room.dtype) @ centroids.transpose(-1, -2)  # [..., KVH, G, clusters]
        share = block_probabilities(logits, self.clusters[layer], room.head_dim**-0.5, 1,
                                    self.scores_kernel)  # fmt: skip
        labels = self.labels[layer][..., : num_blocks * bs].long()  # [..., KVH, tokens]
        block = prefer_earlier(per_block_score(share.gather(-1, labels), bs, self.block_mass))
        if live is not None:
            block = block.masked_fill(dead_blocks(num_blocks, live), float("-inf"))
        return block
