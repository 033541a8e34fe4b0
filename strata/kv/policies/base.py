"""KVPolicy: the seam every KV policy plugs into.

A policy decides, for one sequence, which cached tokens stay in the KV cache and which
blocks each step attends over. The engine owns the memory: it asks the policy for a
keep mask and then compacts the survivors into the sequence's leading blocks, freeing
the rest (runtime/compaction.py).

One policy instance serves one sequence (it may keep per-sequence state, e.g. H2O's
accumulated scores). Its life, driven by the engine (runtime/driver.py):

    prompt tokens     | context ......................... C | rest of prompt | output ...
                      |<-- prefill chunks, observed -------->|
                                           compression point ^  select(keep = budget)
    after a decode step, if evicts_during_decode and slots >= cap + interval:
                                                               select(keep = cap)

- C, the context end, is the whole prompt (query-aware) or the request's
  `kv_compress_prefix` leading tokens (query-agnostic: the tokens after C are computed
  after compression and attend to the compressed context).
- The budget resolves against C: a fraction of C if < 1, else a token count (at most C).
- cap, for policies that evict while decoding, is the slot count at the end of the
  prompt. The cache grows past it by at most interval - 1 slots (the engine's
  kv_evict_interval; the block size by default, 1 for the papers' one-per-step rule).

Slots and positions. Slot s of a layer is the s-th cached token of the sequence in that
layer; its key was cached after RoPE, so compaction keeps each token's original position
for free. Before the first compaction slot == token position. `KVView.positions(layer)`
maps slots to positions at any time. Tokens computed after a compaction take the next
slots in order, so a query at slot s is causal over slots <= s.

Per-head selection. The keep mask is per (layer, KV head): each head keeps its own
tokens, but every head of a layer keeps the same number. Layers may keep different
numbers (`layer_budgets`, PyramidKV); the sequence then holds blocks for the largest.

Scores. A policy that needs attention scores names the queries it wants in
`observed_queries`; while such a step runs, each layer calls `observe` with those
queries (after RoPE) and this layer's cached keys and values, the step's own included.
The policy accumulates what it needs (scored.py). Requests without a policy pay nothing.
Under tensor parallelism each rank holds some heads: the policy names what each rank
shares of an observation (`rank_share`), and rank 0 assembles the one a single rank
would make (runtime/gathered.py).

Attended blocks. Before each step a policy may name, per layer, the blocks the sequence
attends over instead of its own table, without compacting anything (`attended_blocks`,
attended.py): the seam recall policies use.

Compressed KV is query-dependent: it never enters the prefix cache and never goes to
the KV tiers. Blocks the sequence computed before its compression point are indexed as
usual (uncompressed content) and stay cached after compaction replaces them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from strata.kv.policies.rank_share import RankShare

if TYPE_CHECKING:
    from strata.kv.policies.attended import AttendedBlocks, ChunkSlots
    from strata.kv.policies.model_access import ModelAccess
    from strata.kv.policies.observation import LayerObservation


@dataclass(frozen=True)
class AttentionShape:
    """The model's attention shape, as a policy needs it."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads


class KVView(Protocol):
    """What a policy sees of its sequence's KV when it selects."""

    @property
    def context_len(self) -> int:
        """C: the prompt tokens that form the compressible context."""
        ...

    @property
    def num_computed(self) -> int:
        """Tokens whose KV has been computed (cached or evicted)."""
        ...

    @property
    def device(self) -> torch.device: ...

    def num_slots(self, layer: int) -> int:
        """Cached tokens of this layer."""
        ...

    def positions(self, layer: int) -> torch.Tensor:
        """[kv_heads, num_slots(layer)] int64: the token position each slot holds."""
        ...

    def compacts_after(self, end: int) -> bool:
        """Whether the step computing tokens up to `end` is followed by a selection."""
        ...


@dataclass(frozen=True)
class Compaction:
    """A compaction the engine performed: in layer l, new slot t of KV head h holds what
    old slot new_to_old[l][h, t] held; the layer had old_num_slots[l] slots before."""

    new_to_old: list[torch.Tensor]  # per layer [kv_heads, kept_l] int64
    old_num_slots: list[int]


class KVPolicy(ABC):
    """Chooses which of one sequence's cached tokens stay. See the module docstring.

    name: the registry name (strata/kv/policies/registry.py).
    evicts_during_decode: after the prompt, keep the cache at its end-of-prompt size by
    evicting while decoding (StreamingLLM, H2O, TOVA, TreeKV); otherwise the cache is
    compressed once, at the compression point, and grows while decoding (SnapKV).
    """

    name: str = ""
    evicts_during_decode: bool = False

    def __init__(self, shape: AttentionShape) -> None:
        self.shape = shape
        self.model: ModelAccess | None = None  # set by bind

    # ---- scores ------------------------------------------------------------------------

    def observed_queries(self, view: KVView, start: int, end: int) -> tuple[int, int] | None:
        """Token positions [a, b) within [start, end) whose queries to observe in the step
        that computes tokens [start, end); None for none (the default)."""
        return None

    def bind(self, model: ModelAccess) -> None:
        """Receive the model pieces beyond attention scores (RoPE, tokenizer) that some
        policies need (strata/kv/policies/model_access.py), kept as `self.model`."""
        self.model = model

    def reconstruction_passes(self, context_ids: list[int]) -> list[list[int]]:
        """Token ids of extra prefill passes to run after the context, at the compression
        point and before `select`, with their queries observed (KVzip). Each pass starts
        at the slot after the context; its KV is dropped. Default: none."""
        return []

    def first_observed_token(self, context_len: int) -> int:
        """The earliest token whose query the policy needs: a prefix-cache hit never covers
        it, so that query is computed. Default: none needed (the whole context may hit)."""
        return context_len

    def observe(self, obs: LayerObservation) -> None:
        """Receive one layer's observation of the queries asked for this step."""
        return None

    def rank_share(self, view: KVView, start: int, end: int) -> RankShare:
        """Under tensor parallelism, what each rank sends rank 0 of the observation of
        queries [start, end) (rank_share.py). Default: summed attention, all that
        `LayerObservation.summed_attention` needs."""
        return RankShare.SUMMED

    # ---- attention ---------------------------------------------------------------------

    def attended_blocks(self, view: KVView, chunk: ChunkSlots) -> list[AttendedBlocks] | None:
        """Per layer, the blocks the step computing `chunk` attends over (attended.py);
        nothing is compacted or freed. None (the default): every layer attends over the
        sequence's own table, as far as it holds slots."""
        return None

    # ---- selection ---------------------------------------------------------------------

    def layer_budgets(self, keep: int, view: KVView) -> list[int]:
        """Tokens each layer keeps when the sequence as a whole keeps `keep` per layer on
        average. Default: the same in every layer."""
        return [keep] * self.shape.num_layers

    @abstractmethod
    def select(self, view: KVView, keep: list[int]) -> list[torch.Tensor]:
        """Per layer l, a bool mask [kv_heads, view.num_slots(l)] with exactly keep[l]
        True per head: the slots that stay."""

    # ---- bookkeeping -------------------------------------------------------------------

    def remap(self, compaction: Compaction) -> None:
        """The engine compacted the cache; per-slot state must follow (SlotScores.remap)."""
        return None

    def reset(self) -> None:
        """The sequence was preempted and starts over: forget all state."""
        return None


def keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask [..., n] of the k highest scores per row; ties go to the lower slot."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return mask.scatter_(-1, order, True)
