"""ShadowKV (Sun et al., ICML'25) on the recall store: low-rank keys on the GPU, values on
the host, picks by chunk landmarks.

Per sparse layer, on the GPU:

    landmarks [kv_heads, blocks * chunks_per_block, dim]  mean post-RoPE key of each chunk
                                                          of room.landmark_tokens tokens
    spread    [kv_heads, blocks]   1 - the lowest cosine similarity of a block's key to its
                                   chunk's landmark (how badly the landmarks describe it)
    factors   [blocks * block_size, rank]   pre-RoPE keys (every head side by side) in ...
    basis     [rank, model kv_heads * dim]  ... the top right singular vectors of the
                                            prompt's pre-RoPE keys
    outliers      [kv_heads, n]            the n blocks of largest spread so far, ...
    outlier_keys  [kv_heads, n, bs, dim]   ... and their exact post-RoPE keys

The host store keeps every block's values, and its keys only until the basis is fitted
(needs_host_keys): after that every key is rebuilt or an outlier's, on the GPU.

A decode step scores chunks per query head as softmax(q . landmark / sqrt(dim)), takes
the max over the GQA group, and scores a block by its best chunk. The `outliers` blocks
with the largest spread (kept up to date as blocks retire, with their keys) are always
picked, with their exact keys: ShadowKV keeps outliers exact on the GPU. Any other picked
block fetches only its values, and its keys are rebuilt on the GPU as
RoPE(factors @ basis).

The basis of a layer is fitted once, at the first step that selects: the prompt is then
prefilled, and its keys are streamed from the host once (`take_all_keys`). Blocks that
retire after that are projected on the same basis.

Under tensor parallelism a rank holds some KV heads, and the basis and factors span
them all: each rank gathers every head's pre-RoPE keys (HeadShard.gather_heads) to fit
and project, so every rank holds the single rank's basis and factors, and rebuilds its
own heads' keys from its columns of the basis.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from strata.attention.layer_inputs import Rotary
from strata.kv.recall.buffers import Buffers, OwnBuffers
from strata.kv.recall.geometry import SINK_BLOCKS
from strata.kv.recall.policy import RecallPolicy, SummaryRoom, block_probabilities
from strata.kv.recall.working_set import Moves
from strata.ops.rotate_half import rotate_half

RANK = 160  # of the pre-RoPE keys' factorisation (capped at kv_heads * head_dim)
OUTLIER_SHARE = 3 / 16  # of the picks; ShadowKV: 48 outlier chunks at a 256-chunk budget


def chunks_per_block(room: SummaryRoom) -> int:
    """Landmarks per block (both powers of two: a landmark covers at most one block)."""
    return max(1, room.block_size // room.landmark_tokens)



class ShadowKVPolicy(RecallPolicy):
    name = "shadowkv"
    # CUDA: keys rebuilt into the working set by one kernel a layer (off: the torch path;
    # both compared in benchmarks/gpu_recall_check.py)
    rebuild_kernel = True

    def __init__(self) -> None:
        self.room: SummaryRoom | None = None
        self.rope: Rotary | None = None
        self.fitted: list[bool] = []
        # [layers, kv_heads, num_outliers] the blocks of largest spread among those
        # summarized (repeats where fewer exist); kept as blocks retire, read by each step
        self.outliers = torch.zeros(0, dtype=torch.long)

    def allocate(
        self, room: SummaryRoom, rope: Rotary | None = None, buffers: Buffers | None = None
    ) -> None:
        if rope is None:
            raise ValueError("shadowkv rebuilds keys with RoPE: it needs the model's rotary")
        buffers = buffers or OwnBuffers(room.device)
        self.room, self.rope = room, rope
        kvh, d, dt = room.kv_heads, room.head_dim, room.dtype
        blocks, rank = room.max_blocks, self.rank(room)

        def layered(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return buffers.tensor(f"shadowkv.{name}", (room.layers, *shape), dtype, layered=True)

        self.landmarks = layered("landmarks", (kvh, blocks * chunks_per_block(room), d), dt)
        self.spread = layered("spread", (kvh, blocks), torch.float32)
        self.factors = layered("factors", (blocks * room.block_size, rank), dt)
        self.basis = layered("basis", (rank, room.model_kv_heads * d), dt)
        outliers = self.num_outliers(room)
        self.outliers = layered("outliers", (kvh, outliers), torch.long)
        self.outlier_keys = layered("outlier_keys", (kvh, outliers, room.block_size, d), dt)
        self.fitted = [False] * room.layers  # buffers come zeroed: no outliers yet
        heads = room.shard.own_heads(kvh) if room.shard is not None else slice(0, kvh)
        self.heads = torch.arange(heads.start, heads.stop, device=room.device)  # model's ids

    def for_page(self) -> None:
        assert self.room is not None
        self.fitted = [True] * self.room.layers  # the page's rows are all fitted

    @staticmethod
    def rank(room: SummaryRoom) -> int:
        return min(RANK, room.model_kv_heads * room.head_dim)

    @staticmethod
    def num_outliers(room: SummaryRoom) -> int:
        return int(room.slots * OUTLIER_SHARE)

    @staticmethod
    def summary_bytes(room: SummaryRoom) -> int:
        item, rank = room.dtype.itemsize, ShadowKVPolicy.rank(room)
        landmarks = room.nbytes(per_block_vectors=chunks_per_block(room))
        spread = room.layers * room.kv_heads * room.max_blocks * 4
        factors = room.layers * room.max_blocks * room.block_size * rank * item
        basis = room.layers * rank * room.model_kv_heads * room.head_dim * item
        outliers = room.layers * room.kv_heads * ShadowKVPolicy.num_outliers(room)
        outlier_keys = outliers * room.block_size * room.head_dim * item
        return landmarks + spread + factors + basis + outliers * 8 + outlier_keys

    # ---- summaries ------------------------------------------------------------------------------

    def summarize(self, layer: int, first: int, keys: torch.Tensor) -> None:
        self.summarize_layers(slice(layer, layer + 1), first, keys[None])

    def summarize_layers(self, layers: slice, first: int, keys: torch.Tensor) -> None:
        """Landmarks, spread and outliers of every layer at once; the factors of the
        fitted layers at once too, unless heads are spread over ranks."""
        room = self.room
        assert room is not None
        num_layers, kvh, n, bs, d = keys.shape
        per_block = chunks_per_block(room)
        chunks = keys.float().view(num_layers, kvh, n, per_block, bs // per_block, d)
        means = chunks.mean(dim=4)
        span = slice(first * per_block, (first + n) * per_block)
        landmarks = means.reshape(num_layers, kvh, n * per_block, d).to(room.dtype)
        self.landmarks[layers][..., span, :] = landmarks
        similarity = F.cosine_similarity(chunks, means[..., None, :], dim=-1)
        self.spread[layers][..., first : first + n] = 1 - similarity.amin(dim=(3, 4))
        self._keep_outliers(layers, first, keys.to(room.dtype))
        rows = slice(first * bs, (first + n) * bs)
        fitted = [self.fitted[s] for s in range(layers.start, layers.stop)]
        if all(fitted) and room.shard is None:  # [L, n * bs, kv_heads * dim] @ [L, ., rank]
            pre = self._pre_rope(keys, first)
            basis = self.basis[layers].float().transpose(-1, -2)
            self.factors[layers][:, rows] = (pre @ basis).to(room.dtype)
            return
        for i, layer in enumerate(range(layers.start, layers.stop)):
            if fitted[i]:
                pre = self._every_head(self._pre_rope(keys[i], first))
                self.factors[layer][rows] = (pre @ self.basis[layer].float().T).to(room.dtype)

    def _keep_outliers(self, layers: slice, first: int, keys: torch.Tensor) -> None:
        """The outliers of `layers` and their keys, now that middle blocks first.. (keys
        [L, kv_heads, n, bs, dim]) are summarized after blocks 0..first-1: the top of the
        kept outliers and the new blocks (no other old block can outrank a kept one)."""
        n = self.outliers.shape[-1]
        if n == 0:
            return
        num_layers, kvh, new = keys.shape[:3]
        ids = torch.arange(first, first + new, device=keys.device).expand(num_layers, kvh, new)
        kept, kept_keys = self.outliers[layers], self.outlier_keys[layers]
        if first > 0:  # the kept ones: distinct up to min(n, first), repeats after
            ids, keys = torch.cat([kept, ids], -1), torch.cat([kept_keys, keys], 2)
        spread = self.spread[layers].gather(-1, ids)
        spread[..., min(n, first) : n if first > 0 else 0] = float("-inf")
        k = min(n, first + new)
        top = torch.topk(spread, k).indices
        kept[..., :k] = ids.gather(-1, top)
        index = top[..., None, None].expand(num_layers, kvh, k, *keys.shape[3:])
        kept_keys[:, :, :k] = keys.gather(2, index)
        kept[..., k:] = kept[..., :1]
        kept_keys[:, :, k:] = kept_keys[:, :, :1]

    def wants_all_keys(self, layer: int) -> bool:
        return not self.fitted[layer]

    def needs_host_keys(self) -> bool:
        return not all(self.fitted)

    def take_all_keys(self, layer: int, keys: torch.Tensor) -> None:
        """Fit the layer's basis to the pre-RoPE keys of every middle block so far (their
        top right singular vectors: eigenvectors of K^T K), and factor those keys."""
        room = self.room
        assert room is not None
        pre = self._every_head(self._pre_rope(keys, 0))  # [n * bs, model kv_heads * dim]
        _, vectors = torch.linalg.eigh(pre.T @ pre)  # ascending eigenvalues
        basis = vectors[:, -self.rank(room) :].T
        self.basis[layer] = basis.to(room.dtype)
        self.factors[layer][: pre.shape[0]] = (pre @ basis.T).to(room.dtype)
        self.fitted[layer] = True

    def _pre_rope(self, keys: torch.Tensor, first: int) -> torch.Tensor:
        """Post-RoPE keys [..., kv_heads, n, bs, dim] of middle blocks first.. back to
        pre-RoPE, as [..., n * bs, kv_heads * dim] float32 rows."""
        *lead, kvh, n, bs, d = keys.shape
        cos, sin = self._tables(torch.arange(first, first + n, device=keys.device), bs)
        y = keys.float()
        # RoPE scales by cos^2 + sin^2 (1 unless the rope type scales attention)
        pre = (y * cos - rotate_half(y) * sin) / (cos * cos + sin * sin)
        return pre.movedim(-4, -2).reshape(*lead, n * bs, kvh * d)

    def _every_head(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [n, kv_heads * dim] of this rank's heads -> of the model's (ranks.py)."""
        room = self.room
        assert room is not None
        return rows if room.shard is None else room.shard.gather_heads(rows)

    def _own_basis(self, layer: int) -> torch.Tensor:
        """The layer's basis for this rank's heads, [..., kv_heads, rank, dim]."""
        room = self.room
        assert room is not None
        basis = self.basis[layer]
        basis = basis.view(*basis.shape[:-2], self.rank(room), room.model_kv_heads, room.head_dim)
        if room.shard is not None:
            basis = basis[..., room.shard.own_heads(room.kv_heads), :]
        return basis.transpose(-3, -2)

    def _tables(self, blocks: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [*blocks.shape, bs, dim] float32 at the positions of middle blocks."""
        assert self.rope is not None
        offsets = torch.arange(bs, device=blocks.device)
        positions = (blocks[..., None] + SINK_BLOCKS) * bs + offsets
        return self.rope.cos[positions].float(), self.rope.sin[positions].float()

    # ---- a decode step --------------------------------------------------------------------------

    def scores(
        self, layer: int, q: torch.Tensor, num_blocks: int, live: torch.Tensor | None = None
    ) -> torch.Tensor:
        room = self.room
        assert room is not None
        per_block = chunks_per_block(room)
        landmarks = self.landmarks[layer][..., : num_blocks * per_block, :]
        logits = q.to(room.dtype) @ landmarks.transpose(-1, -2)  # [..., KVH, G, chunks]
        block = block_probabilities(logits, live, room.head_dim**-0.5, per_block,
                                    self.scores_kernel)  # fmt: skip
        # above any probability: always picked (every outlier is a live block)
        return block.scatter(-1, self.outliers[layer], 2.0)

    def write_rebuilt_keys(self, layer: int, moves: Moves, slots_k: torch.Tensor) -> bool:
        """On CUDA, one kernel per layer rebuilds the moved blocks' keys straight into
        their slots (`rebuild_into`); elsewhere the torch path."""
        from strata.ops.triton_rebuild_keys import fits, rebuild_keys

        room = self.room
        if room is None or not self.fitted[layer]:
            return False
        kernel = self.rebuild_kernel and fits(room.block_size, room.head_dim)
        if not (slots_k.is_cuda and kernel):
            return super().write_rebuilt_keys(layer, moves, slots_k)
        self.rebuild_into(rebuild_keys, layer, moves, slots_k)
        return True

    def rebuild_into(
        self, kernel: Callable[..., None], layer: int, moves: Moves, slots_k: torch.Tensor
    ) -> None:
        """Run `kernel` (strata/ops/triton_rebuild_keys.py's rebuild_keys, or the same
        interpreted, in tests) over the layer's summaries: the moved blocks' keys go into
        their slots of slots_k."""
        assert self.rope is not None
        one = moves.blocks.dim() == 2  # a sequence's own buffers, not a page's rows
        lead = (lambda x: x[None]) if one else (lambda x: x)
        kernel(
            lead(self.factors[layer]), lead(self.basis[layer]), self.rope.cos, self.rope.sin,
            lead(self.outliers[layer]), lead(self.outlier_keys[layer]), lead(moves.blocks),
            lead(moves.slots), lead(moves.mask), self.heads, lead(slots_k), SINK_BLOCKS,
        )  # fmt: skip

    def rebuilt_keys(self, layer: int, blocks: torch.Tensor) -> torch.Tensor | None:
        room, outliers = self.room, self.outliers[layer]
        if room is None or not self.fitted[layer]:
            return None
        *lead, kvh, n = blocks.shape
        bs, d, rank = room.block_size, room.head_dim, self.rank(room)
        rows = blocks[..., None] * bs + torch.arange(bs, device=blocks.device)
        index = rows.reshape(*lead, kvh * n * bs, 1).expand(*lead, kvh * n * bs, rank)
        factors = self.factors[layer].gather(-2, index).view(*lead, kvh, n * bs, rank)
        pre = (factors @ self._own_basis(layer)).float().view(*lead, kvh, n, bs, d)
        cos, sin = self._tables(blocks, bs)
        keys = (pre * cos + rotate_half(pre) * sin).to(room.dtype)
        if outliers.shape[-1] > 0:  # the outliers' exact keys instead
            match = blocks[..., None] == outliers[..., None, :]  # [..., kvh, n, outliers]
            which = match.int().argmax(-1)[..., None, None].expand(*blocks.shape, bs, d)
            exact = self.outlier_keys[layer].gather(-3, which)
            keys = torch.where(match.any(-1)[..., None, None], exact, keys)
        return keys
