"""RecallPolicy: how a recall policy summarises blocks and scores them for a query.

A recall policy keeps every block (in the host store, host_store.py) and small
summaries on the GPU. Each decode step, per sparse layer and KV head, it scores the
sequence's middle blocks against the step's query; the top `budget_blocks` are attended
(fetched through the working set, working_set.py). Query heads of a GQA group share
one selection (each policy says how it combines them). One instance serves one sequence.

`selects` False (full_offload): every middle block is attended, streamed from the host
each step; no summaries, no working set. `samples` (magicpig): so too while the middle
fits the budget; past it, the policy samples middle keys, attended on the host
(sampled_attention.py).

A policy may rebuild a fetched block's keys on the GPU instead of moving them
(`rebuilt_keys`, written into the working set by `write_rebuilt_keys`: ShadowKV); then
only values cross from the host. A policy whose
summaries need every key of a layer at once (a basis fitted to the whole prompt) says so
in `wants_all_keys` and gets them, streamed from the host, in `take_all_keys`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from strata.attention.layer_inputs import Rotary
from strata.kv.recall.buffers import Buffers
from strata.kv.recall.ranks import HeadShard
from strata.kv.recall.working_set import Moves


@dataclass(frozen=True)
class SummaryRoom:
    """What a sequence's summaries must cover: up to `max_blocks` middle blocks in each
    of `layers` sparse layers and `kv_heads` heads."""

    layers: int
    kv_heads: int
    max_blocks: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    slots: int = 0  # blocks a decode step picks per layer and head (the working set)
    device: torch.device | None = None  # None: the CPU
    landmark_tokens: int = 8  # tokens per landmark, for policies that keep landmarks
    shard: HeadShard | None = None  # under tensor parallelism: kv_heads are this rank's
    quest_page_tokens: int = 0  # tokens per quest min/max page; 0: one page per block

    @property
    def model_kv_heads(self) -> int:
        """The whole model's KV heads (kv_heads unless tensor-parallel)."""
        return self.kv_heads if self.shard is None else self.shard.model_kv_heads

    def nbytes(self, per_block_vectors: int) -> int:
        """Bytes of `per_block_vectors` head_dim vectors per block, layer and head."""
        item = self.dtype.itemsize
        cells = self.layers * self.kv_heads * self.max_blocks * per_block_vectors
        return cells * self.head_dim * item


class RecallPolicy(ABC):
    name: str = ""
    selects: bool = True
    # True (magicpig): past the budget, a decode step samples middle keys and attends them on
    # the host (sampled_attention.py); selects is then False
    samples: bool = False
    # CUDA: the scores' softmax and maxima in one Triton kernel (block_probabilities; off:
    # about ten torch kernels; both compared in benchmarks/gpu_recall_check.py)
    scores_kernel = True

    @abstractmethod
    def allocate(
        self, room: SummaryRoom, rope: Rotary | None = None, buffers: Buffers | None = None
    ) -> None:
        """Room for the summaries of a sequence's middle blocks, on room.device, from
        `buffers` (default: its own; buffers.py). `rope`: the model's rotary tables
        (middle block j holds positions (j + 1) * block_size on)."""

    @abstractmethod
    def summarize(self, layer: int, first: int, keys: torch.Tensor) -> None:
        """Record middle blocks first, first+1, ... of sparse layer `layer` from their
        post-RoPE keys [kv_heads, n blocks, block_size, head_dim]."""

    def summarize_layers(self, layers: slice, first: int, keys: torch.Tensor) -> None:
        """`summarize` for each of sparse layers `layers` (keys [L, kv_heads, n, bs, dim]);
        a policy may do them all at once (one set of kernels, not L)."""
        for i, layer in enumerate(range(layers.start, layers.stop)):
            self.summarize(layer, first, keys[i])

    @abstractmethod
    def scores(
        self, layer: int, q: torch.Tensor, num_blocks: int, live: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[..., kv_heads, num_blocks] float32 scores of the first num_blocks middle blocks
        for one query q [..., kv_heads, group, head_dim] (post-RoPE; the leading dimension,
        if any, is a page's rows). `live` [...]: a device count; when given only the first
        `live` blocks exist and the others score -inf (a shape that does not change as
        blocks retire, for CUDA graphs)."""

    @staticmethod
    def summary_bytes(room: SummaryRoom) -> int:
        """GPU bytes `allocate(room)` takes."""
        return 0

    @staticmethod
    def host_bytes(room: SummaryRoom) -> int:
        """Host bytes its own structures take at most, beside the store (magicpig's
        tables), for room.max_blocks middle blocks."""
        return 0

    def wants_all_keys(self, layer: int) -> bool:
        """True when `take_all_keys` must run for `layer` before its next `scores`."""
        return False

    def take_all_keys(self, layer: int, keys: torch.Tensor) -> None:
        """Every middle block's post-RoPE keys of `layer` so far, [kv_heads, n, bs, dim]."""
        return None

    def rebuilt_keys(self, layer: int, blocks: torch.Tensor) -> torch.Tensor | None:
        """Post-RoPE keys of middle blocks [..., kv_heads, n], made on the GPU,
        [..., kv_heads, n, bs, dim]; None: every key comes from the host."""
        return None

    def write_rebuilt_keys(self, layer: int, moves: Moves, slots_k: torch.Tensor) -> bool:
        """Write the keys `rebuilt_keys` makes for the moves' blocks into their slots of
        `slots_k` (a layer's working-set keys, [..., kv_heads, slots, bs, dim]) where
        moves.mask; False, writing nothing, when every key comes from the host."""
        keys = self.rebuilt_keys(layer, moves.blocks)
        if keys is None:
            return False
        index = moves.slots[..., None, None].expand_as(keys)
        held = slots_k.gather(-3, index)
        slots_k.scatter_(-3, index, torch.where(moves.mask[..., None, None], keys, held))
        return True

    def needs_host_keys(self) -> bool:
        """Whether the sequence's decode steps still read keys from the host store; once
        False (after a `take_all_keys`), its key slots go back to the store."""
        return True

    def for_page(self) -> None:
        """This instance is bound to a page's whole buffers and scores its rows, all of
        which are past what `wants_all_keys` asks for."""
        return None


def block_probabilities(
    logits: torch.Tensor, live: torch.Tensor | None, scale: float, per_block: int, kernel: bool,
    mass: bool = False,
) -> torch.Tensor:  # fmt: skip
    """[..., kv_heads, blocks] float32: from summaries' logits [..., kv_heads, group, n]
    (per_block summaries a block), each query head's softmax over the live summaries of
    logits * scale, its maximum over the group, then the maximum over the block's
    summaries (or, with `mass`, their sum: the block's share of the attention when each
    summary is a token); -inf for the blocks at or past `live` [...] (None: every block
    lives). On CUDA with `kernel`, the maximum is one Triton kernel (triton_block_scores.py)."""
    if kernel and logits.is_cuda and not mass:
        from strata.ops.triton_block_scores import block_scores

        return block_scores(logits.contiguous(), live, scale, per_block)
    num_blocks = logits.shape[-1] // per_block
    dead = None if live is None else dead_blocks(num_blocks, live)  # [..., 1, blocks]
    if dead is not None:  # dead summaries get no probability
        logits = logits.masked_fill(dead.repeat_interleave(per_block, dim=-1)[..., None, :],
                                    float("-inf"))  # fmt: skip
    chunk = (logits.float() * scale).softmax(dim=-1).amax(dim=-2)
    block = per_block_score(chunk, per_block, mass)
    return block if dead is None else block.masked_fill(dead, float("-inf"))


def per_block_score(scores: torch.Tensor, per_block: int, mass: bool) -> torch.Tensor:
    """[..., blocks]: scores [..., blocks * per_block] of a block's summaries (or tokens)
    reduced to the block's: their maximum, or with `mass` their sum."""
    per = scores.view(*scores.shape[:-1], -1, per_block)
    return per.sum(dim=-1) if mass else per.amax(dim=-1)


TIE = 2.0**-22  # prefer_earlier: block i's score is scaled by 1 - TIE * i


def prefer_earlier(block: torch.Tensor) -> torch.Tensor:
    """Block scores [..., blocks] with ties broken towards the earlier block: block i's
    score scaled by 1 - TIE * i (exact factors while i < 2^21), so tied blocks end at
    least two float32 roundings apart. topk breaks exact ties however its shape and device
    happen to, so a page and a sequence alone could pick apart; a policy whose blocks tie
    (tokens of one cluster, or of one code) scores through this. Blocks whose scores lie
    within TIE * blocks (relative) of each other may swap: 0.05% at 2,048 blocks."""
    index = torch.arange(block.shape[-1], device=block.device, dtype=torch.float32)
    return block * (1 - TIE * index)


def dead_blocks(num_blocks: int, live: torch.Tensor) -> torch.Tensor:
    """[..., 1, num_blocks] bool: the blocks at or past the device count `live` [...],
    ready to broadcast over kv heads."""
    return (torch.arange(num_blocks, device=live.device) >= live[..., None])[..., None, :]


class FullOffloadPolicy(RecallPolicy):
    """Attends every block: the lossless baseline of the recall store."""

    name = "full_offload"
    selects = False

    def allocate(
        self, room: SummaryRoom, rope: Rotary | None = None, buffers: Buffers | None = None
    ) -> None:
        return None

    def summarize(self, layer: int, first: int, keys: torch.Tensor) -> None:
        return None

    def scores(
        self, layer: int, q: torch.Tensor, num_blocks: int, live: torch.Tensor | None = None
    ) -> torch.Tensor:
        raise TypeError("full_offload attends every block: it never scores")
