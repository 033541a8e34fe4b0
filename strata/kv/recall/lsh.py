"""SimHash over K bits x L tables, and the host's tables of one layer's key codes.

A vector x hashes, in table l, to the K-bit code of the signs of x . r for the K random
directions r of that table (one seeded [head_dim, K * L] projection, shared by every
layer). A query q and a key k share a table's code with probability P = p^K, where
p = 1 - angle(q, k) / pi; they collide in at least two of the L tables with probability

    w = 1 - Q^L - L P Q^(L-1) = 1 - Q^(L-1) (Q + L P),   Q = 1 - P

(MagicPIG's sampling probability; attention over the sampled keys divides each one's
weight by its w).

HashTables: a layer's codes, per KV head and table, sorted by code (`order` of token ids
and each code's `offsets`), and the codes of tokens added since the last sort, compared
one by one. `candidates` finds, per query head, every token colliding with it in at least
two tables, without comparing the sorted tokens one by one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MIN_COLLISIONS = 2  # tables a key shares with the query to be sampled (MagicPIG)


def projection(head_dim: int, bits: int, tables: int, device: torch.device | None,
               seed: int = 0) -> torch.Tensor:  # fmt: skip
    """[head_dim, bits * tables] float32 Gaussian directions, the same for a seed anywhere."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(head_dim, bits * tables, generator=generator).to(device)


def hash_codes(x: torch.Tensor, proj: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., tables] int16 codes of vectors x [..., head_dim]: bit j of table l is set where
    x . proj[:, l * bits + j] > 0."""
    signs = (x.float() @ proj) > 0
    signs = signs.view(*signs.shape[:-1], -1, bits)
    weights = 2 ** torch.arange(bits, device=x.device, dtype=torch.int32)
    return (signs.to(torch.int32) * weights).sum(-1).to(torch.int16)


def sampling_probability(cos: torch.Tensor, bits: int, tables: int) -> torch.Tensor:
    """w for cosines `cos` between queries and (centred) keys, float32 in (0, 1]."""
    p = 1 - torch.arccos(cos.float().clamp(-1, 1)) / math.pi
    single = p**bits
    miss = 1 - single
    w = 1 - miss ** (tables - 1) * (miss + tables * single)
    return w.clamp(min=torch.finfo(torch.float32).tiny)


@dataclass(frozen=True)
class Candidates:
    heads: torch.Tensor  # [n] int64 query head of each sampled (head, token) pair
    tokens: torch.Tensor  # [n] int64 its token, among the layer's coded tokens


class HashTables:
    """One layer's codes on the host: `sorted_tokens` of them sorted per KV head and
    table, the rest (`tail`, [kv_heads, n, tables] int16) in order after them."""

    def __init__(self, codes: torch.Tensor, bits: int) -> None:
        """codes [kv_heads, n, tables] int16 on the CPU, of tokens 0..n-1."""
        kvh, n, tables = codes.shape
        self.bits, self.num_tables, self.kv_heads = bits, tables, kvh
        self.sorted_codes = codes  # kept for the next sort
        by_table = codes.permute(0, 2, 1).contiguous()  # [kvh, tables, n]
        order = by_table.sort(dim=-1, stable=True).indices
        self.order = order.to(torch.int32).contiguous()  # flat below: row r at r * n
        by_table = by_table.to(torch.int64)
        buckets = 1 << bits
        rows = torch.arange(kvh * tables).view(kvh, tables, 1) * buckets
        counts = torch.bincount((rows + by_table).flatten(), minlength=kvh * tables * buckets)
        offsets = torch.zeros(kvh * tables * buckets + 1, dtype=torch.int64)
        offsets[1:] = counts.cumsum(0)
        self.offsets = offsets  # bucket (head, table, code) holds order[starts:ends], flat
        self.sorted_tokens = n
        self.tail = codes.new_zeros((kvh, 0, tables))

    @property
    def num_tokens(self) -> int:
        return self.sorted_tokens + self.tail.shape[1]

    @property
    def codes(self) -> torch.Tensor:
        """[kv_heads, num_tokens, tables] every token's codes (a copy: for a sort)."""
        return torch.cat([self.sorted_codes, self.tail], dim=1)

    def codes_from(self, first: int) -> torch.Tensor:
        """The codes of tokens first.. (first >= sorted_tokens: from the tail alone)."""
        if first < self.sorted_tokens:
            raise ValueError(f"token {first} is among the {self.sorted_tokens} sorted ones")
        return self.tail[:, first - self.sorted_tokens :]

    def append(self, codes: torch.Tensor) -> None:
        """Codes [kv_heads, n, tables] of the next n tokens (copies only the tail)."""
        self.tail = torch.cat([self.tail, codes], dim=1)

    def resorted(self) -> HashTables:
        """Tables with every token sorted (built from the kept codes)."""
        return HashTables(self.codes, self.bits)

    def candidates(self, query_codes: torch.Tensor, group: int, first_head: int = 0) -> Candidates:
        """Every (query head, token) colliding in at least MIN_COLLISIONS tables, for the
        codes [heads, tables] of query heads first_head.., whose KV head is head // group;
        sorted by head, then token. Heads split into runs give, concatenated, what they
        give together."""
        heads = query_codes.shape[0]
        kv = (torch.arange(heads) + first_head) // group
        total = self.num_tokens
        # collisions of each (query head, token): at most num_tables, so a byte holds them
        hits = torch.zeros(heads * total, dtype=torch.uint8)
        if self.sorted_tokens:
            keys = self._bucket_keys(query_codes.to(torch.int64), kv, total)
            one = torch.ones(1, dtype=torch.uint8).expand(keys.numel())
            hits.index_put_((keys,), one, accumulate=True)
        if self.tail.shape[1]:
            same = (self.tail[kv] == query_codes[:, None, :]).sum(-1, dtype=torch.int32)
            hits.view(heads, total)[:, self.sorted_tokens :] += same.to(torch.uint8)
        picked = (hits >= MIN_COLLISIONS).nonzero().flatten()
        return Candidates(picked // total + first_head, picked % total)

    def _bucket_keys(self, query_codes: torch.Tensor, kv: torch.Tensor, total: int) -> torch.Tensor:
        """head * total + token for every sorted token in a query head's bucket of each
        table, head by head and table by table. Each bucket is a run of `order`: the runs'
        places and heads are cumulative sums of steps of 1 (and 0) that jump at each
        run's first element, so no index is repeated per element."""
        heads, tables = query_codes.shape
        bucket = ((kv[:, None] * tables + torch.arange(tables)) << self.bits) + query_codes
        starts, ends = self.offsets[bucket].flatten(), self.offsets[bucket + 1].flatten()
        filled = ends > starts
        if not filled.any():
            return starts.new_zeros(0)
        starts, lengths = starts[filled], (ends - starts)[filled]
        base = torch.arange(heads).repeat_interleave(tables)[filled] * total
        first = lengths.cumsum(0) - lengths  # each run's place in the result
        pairs = int(lengths.sum())
        zero = starts.new_zeros(1)
        place_steps = torch.ones(pairs, dtype=torch.int64)  # from the run before's last place
        place_steps[first] = starts - torch.cat([zero, (starts + lengths - 1)[:-1]])
        base_steps = torch.zeros(pairs, dtype=torch.int64)
        base_steps[first] = base - torch.cat([zero, base[:-1]])
        return base_steps.cumsum(0) + self.order.flatten()[place_steps.cumsum(0)]
