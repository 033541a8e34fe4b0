"""LayerObservation: one layer's view of the queries a policy asked for, in one step.

The observer (runtime/observer.py) builds one per layer and policy that asked, after the
step's K/V are written, so the keys read back include the step's own tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import torch


class ReadSlots(Protocol):
    def __call__(self, layer: int, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of the sequence's first `num_slots` slots in `layer`."""
        ...


@dataclass(frozen=True, eq=False)
class LayerObservation:
    """queries      [m, num_heads, head_dim]  after RoPE, in token order
    query_slots  [m]                       slot of each query in this layer
    keys/values  [n, kv_heads, head_dim]   the layer's cache in slot order, this step's
                                           tokens included (gathered on first use)
    probs        [kv_heads, group, m, n]   the queries' attention when the observer
                                           already computed it (a batch of decode rows)
    summed       [kv_heads, n]             summed_attention() when the observer already
                                           computed it (under tensor parallelism: every
                                           rank's heads, runtime/gathered.py)
    maxed        [kv_heads, n]             max_attention(), likewise
    """

    layer: int
    queries: torch.Tensor
    query_slots: torch.Tensor
    read_slots: ReadSlots
    num_slots: int
    scale: float
    probs: torch.Tensor | None = None
    summed: torch.Tensor | None = None
    maxed: torch.Tensor | None = None

    QUERY_CHUNK = 256  # queries per softmax in summed_attention: bounds temporary memory

    @cached_property
    def _kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.read_slots(self.layer, self.num_slots)

    @property
    def keys(self) -> torch.Tensor:
        return self._kv[0]

    @property
    def values(self) -> torch.Tensor:
        return self._kv[1]

    def attention(self, first: int = 0, end: int | None = None) -> torch.Tensor:
        """Softmax attention of queries [first, end): [kv_heads, group, m, n] float32.

        Causal over slots (a query attends to slots <= its own), exactly as the model
        attended; rows of one KV head's query heads are grouped (GQA)."""
        if self.probs is not None:
            return self.probs[:, :, first:end]
        q = self.queries[first:end].float()
        slots = self.query_slots[first:end]
        k = self.keys.float()
        kv_heads = k.shape[1]
        m, heads, dim = q.shape
        q = q.view(m, kv_heads, heads // kv_heads, dim).permute(1, 2, 0, 3)
        logits = torch.einsum("hgmd,nhd->hgmn", q, k) * self.scale
        key_slot = torch.arange(self.num_slots, device=q.device)
        logits.masked_fill_(key_slot[None, :] > slots[:, None], float("-inf"))
        return torch.softmax(logits, dim=-1)

    def summed_attention(self) -> torch.Tensor:
        """[kv_heads, n] float32: attention summed over the queries and each KV head's
        query heads."""
        if self.summed is not None:
            return self.summed
        if self.probs is not None:
            return self.probs.sum(dim=(1, 2))
        total = torch.zeros(self.keys.shape[1], self.num_slots, device=self.queries.device)
        for first in range(0, self.queries.shape[0], self.QUERY_CHUNK):
            total += self.attention(first, first + self.QUERY_CHUNK).sum(dim=(1, 2))
        return total

    def max_attention(self) -> torch.Tensor:
        """[kv_heads, n] float32: the largest attention any query and any of each KV head's
        query heads gives each slot."""
        if self.maxed is not None:
            return self.maxed
        best = torch.zeros(self.keys.shape[1], self.num_slots, device=self.queries.device)
        for first in range(0, self.queries.shape[0], self.QUERY_CHUNK):
            best = torch.maximum(best, self.attention(first, first + self.QUERY_CHUNK).amax((1, 2)))
        return best
