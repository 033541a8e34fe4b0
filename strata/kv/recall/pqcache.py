"""PQCache (Zhang et al., SIGMOD'25) on the recall store: product-quantised keys on the
GPU rank tokens by an approximate q.k; a step attends the blocks they weigh most.

Per sparse layer, on the GPU:

    codebooks [kv_heads, SUBSPACES, CODEWORDS, head_dim / SUBSPACES]   room.dtype
        per head and subspace, the k-means (l2) centroids of the middle tokens' post-RoPE
        key sub-vectors (dims sub * head_dim / SUBSPACES on) of the prompt
    codes     [kv_heads, blocks * block_size, SUBSPACES]   uint8
        per middle token, the index of its sub-vectors' nearest codeword

Invariants: every code is its sub-vector's nearest codeword (l2; ties: the lowest index)
among the layer's first `codewords[layer]` = min(CODEWORDS, tokens fitted) codewords;
the codewords past those are zero and no code names them. A layer's codes are written
only once it is fitted: until then `wants_all_keys` holds, and `take_all_keys` fits the
codebooks to every middle key so far and codes them; blocks that retire after that are
coded with the same codebooks. The host store keeps every key (needs_host_keys): picked
blocks fetch their exact keys.

A decode step builds per query head a table of q_sub . codeword [.., SUBSPACES,
CODEWORDS]; a token's approximate logit is the sum over subspaces of its codes' entries
(q . its reconstructed key). Each query head takes a softmax of those over the
live tokens; a token scores its largest probability over the GQA group, and a block the
sum over its tokens (`block_mass`): its estimated share of the attention, so a block of
several likely tokens outranks one that holds a single one (measured by
benchmarks/recall_selection_mass.py). With block_mass off, a block scores its best
token, and the top blocks are the blocks of the top tokens, in order. Tokens sharing
their codes tie exactly, and so may blocks: the earlier block wins (prefer_earlier),
whatever the shape scored.

Under tensor parallelism each rank quantises its own KV heads: nothing is shared.
"""

from __future__ import annotations

import torch

from strata.attention.layer_inputs import Rotary
from strata.kv.recall.buffers import Buffers, OwnBuffers
from strata.kv.recall.kmeans import kmeans, nearest
from strata.kv.recall.policy import (
    RecallPolicy,
    SummaryRoom,
    block_probabilities,
    prefer_earlier,
)

SUBSPACES = 2  # sub-vectors a key splits into (PQCache's SUBVEC)
BITS = 6  # per code (PQCache's SUBBITS)
CODEWORDS = 2**BITS  # per subspace codebook
# k-means rounds of a fit; a layer of 8 KV heads x 6,400 tokens x 128 dims fits in 8 ms on
# an H100, 3 heads x 4,000 tokens x 64 dims in 0.13 s on two CPU cores
ITERATIONS = 20
SEED = 0  # of k-means' starting points


class PQCachePolicy(RecallPolicy):
    name = "pqcache"
    # a block's score: the sum of its tokens' shares, its estimated attention mass (True),
    # or its best token's share (False)
    block_mass = True

    def __init__(self) -> None:
        self.room: SummaryRoom | None = None
        self.fitted: list[bool] = []
        self.codewords: list[int] = []  # per layer: codewords in use once fitted

    def allocate(
        self, room: SummaryRoom, rope: Rotary | None = None, buffers: Buffers | None = None
    ) -> None:
        if room.head_dim % SUBSPACES:
            raise ValueError(
                f"pqcache splits keys into {SUBSPACES} sub-vectors: head_dim {room.head_dim} "
                f"is not a multiple of {SUBSPACES}"
            )
        buffers = buffers or OwnBuffers(room.device)
        self.room = room
        kvh, sub = room.kv_heads, room.head_dim // SUBSPACES
        tokens = room.max_blocks * room.block_size
        self.codebooks = buffers.tensor(
            "pqcache.codebooks", (room.layers, kvh, SUBSPACES, CODEWORDS, sub), room.dtype,
            layered=True,
        )  # fmt: skip
        self.codes = buffers.tensor(
            "pqcache.codes", (room.layers, kvh, tokens, SUBSPACES), torch.uint8, layered=True
        )
        self.fitted = [False] * room.layers
        self.codewords = [0] * room.layers

    def for_page(self) -> None:
        assert self.room is not None
        self.fitted = [True] * self.room.layers  # the page's rows are all fitted: it only scores

    @staticmethod
    def summary_bytes(room: SummaryRoom) -> int:
        cells = room.layers * room.kv_heads
        codebooks = cells * CODEWORDS * room.head_dim * room.dtype.itemsize
        codes = cells * room.max_blocks * room.block_size * SUBSPACES  # uint8
        return codebooks + codes

    # ---- summaries ------------------------------------------------------------------------------

    def summarize(self, layer: int, first: int, keys: torch.Tensor) -> None:
        self.summarize_layers(slice(layer, layer + 1), first, keys[None])

    def summarize_layers(self, layers: slice, first: int, keys: torch.Tensor) -> None:
        """Code middle blocks first.. (keys [L, kv_heads, n, bs, dim]) of the fitted layers
        with their codebooks, layers of one codebook size at once; unfitted layers record
        nothing (their fit codes every block). Coding a block again rewrites its codes."""
        ids = range(layers.start, layers.stop)
        sizes = {self.codewords[s] for s in ids if self.fitted[s]}
        if len(sizes) == 1 and all(self.fitted[s] for s in ids):
            self._code(layers, first, keys)
            return
        for i, s in enumerate(ids):
            if self.fitted[s]:
                self._code(slice(s, s + 1), first, keys[i : i + 1])

    def wants_all_keys(self, layer: int) -> bool:
        return not self.fitted[layer]

    def take_all_keys(self, layer: int, keys: torch.Tensor) -> None:
        """Fit the layer's codebooks to every middle key so far (keys [kv_heads, n, bs,
        dim]): k-means per head and subspace, min(CODEWORDS, n * bs) codewords; then code
        those keys."""
        room = self.room
        assert room is not None
        points = sub_vectors(keys[None])[0]  # [kv_heads, SUBSPACES, n * bs, dim / SUBSPACES]
        k = min(CODEWORDS, points.shape[-2])
        fit = kmeans(points, k, ITERATIONS, SEED, "l2")
        codebooks = self.codebooks[layer]
        codebooks.zero_()
        codebooks[..., :k, :] = fit.centroids.to(room.dtype)
        self.fitted[layer], self.codewords[layer] = True, k
        self._code(slice(layer, layer + 1), 0, keys[None])

    def _code(self, layers: slice, first: int, keys: torch.Tensor) -> None:
        """Codes of middle blocks first.. (keys [L, kv_heads, n, bs, dim]) of fitted
        layers whose codebooks have one size: each sub-vector's nearest codeword."""
        room = self.room
        assert room is not None
        k = self.codewords[layers.start]
        n, bs = keys.shape[2], keys.shape[3]
        codebooks = self.codebooks[layers][..., :k, :]  # [L, kv_heads, SUBSPACES, k, sub]
        labels = nearest(sub_vectors(keys), codebooks, "l2")  # [L, kv_heads, SUBSPACES, n * bs]
        rows = slice(first * bs, (first + n) * bs)
        self.codes[layers][:, :, rows] = labels.transpose(-1, -2).to(torch.uint8)

    # ---- a decode step --------------------------------------------------------------------------

    def scores(
        self, layer: int, q: torch.Tensor, num_blocks: int, live: torch.Tensor | None = None
    ) -> torch.Tensor:
        room = self.room
        assert room is not None
        *lead, kvh, group, d = q.shape
        tokens = num_blocks * room.block_size
        parts = q.float().view(*lead, kvh, group, SUBSPACES, d // SUBSPACES)
        codebooks = self.codebooks[layer].float()  # [..., kv_heads, SUBSPACES, CODEWORDS, sub]
        # table[..., h, g, s, c] = q_s . codeword c of subspace s
        table = torch.einsum("...hgsd,...hscd->...hgsc", parts, codebooks)
        codes = self.codes[layer][..., :tokens, :]  # [..., kv_heads, tokens, SUBSPACES]

        def entries(s: int) -> torch.Tensor:  # [..., kv_heads, group, tokens]: subspace s's
            index = codes[..., s].long()[..., None, :].expand(*lead, kvh, group, tokens)
            return table[..., s, :].gather(-1, index)

        # a gather a subspace: on CUDA 40% faster than one gather of them all
        logits = entries(0)  # then q . each token's reconstructed key
        for s in range(1, SUBSPACES):
            logits = logits + entries(s)
        block = block_probabilities(logits, live, d**-0.5, room.block_size, self.scores_kernel,
                                    mass=self.block_mass)  # fmt: skip
        return prefer_earlier(block)  # tokens sharing their codes tie


def sub_vectors(keys: torch.Tensor) -> torch.Tensor:
    """Keys [L, kv_heads, n, bs, dim] as [L, kv_heads, SUBSPACES, n * bs, dim / SUBSPACES]:
    each token's sub-vectors, subspace by subspace."""
    num_layers, kvh, n, bs, d = keys.shape
    split = keys.reshape(num_layers, kvh, n * bs, SUBSPACES, d // SUBSPACES)
    return split.transpose(2, 3)
