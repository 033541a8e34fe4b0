"""ShardLayout: which part of a model one tensor-parallel rank holds (Megatron-style).

For N ranks, rank r holds:

    query heads        [r*h/N, (r+1)*h/N)             h % N == 0
    KV heads           kv >= N: [r*kv/N, (r+1)*kv/N)   kv % N == 0
                       kv <  N: head r*kv // N alone   N % kv == 0 (replicated N/kv times)
    MLP / expert rows  [r*I/N, (r+1)*I/N) of gate and of up; the same columns of down
    vocabulary rows    [r*Vp, (r+1)*Vp), Vp = ceil(V/N); rows past V are zero padding

Column-parallel projections (qkv, gate/up) need no communication; row-parallel ones
(o, down, an MoE block's sum) produce partial sums, all-reduced once. A replicated KV
head keeps each rank's query heads inside their own GQA group: with kv < N a rank's
h/N query heads all belong to KV head r*kv // N.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from strata.config import ModelConfig


def check_shardable(cfg: ModelConfig, size: int) -> None:
    """ValueError naming the model dimension that `size` ranks cannot split evenly."""
    dims = {
        "attention heads (num_attention_heads)": cfg.num_heads,
        "MLP width (intermediate_size)": cfg.intermediate_size,
    }
    if cfg.is_moe:
        dims["expert width (moe_intermediate_size)"] = cfg.moe_intermediate_size
    if cfg.shared_expert_intermediate_size:
        dims["shared expert width"] = cfg.shared_expert_intermediate_size
    for what, value in dims.items():
        if value % size:
            raise ValueError(
                f"tensor_parallel_size {size} does not divide the model's {value} {what}"
            )
    kv = cfg.num_kv_heads
    if kv % size and size % kv:
        raise ValueError(
            f"tensor_parallel_size {size} must divide the model's {kv} KV heads or be a "
            f"multiple of them (then each KV head is replicated)"
        )


@dataclass(frozen=True)
class ShardLayout:
    """Rank `rank` of `size` over a model of config `full` (see module docstring)."""

    full: ModelConfig
    rank: int
    size: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is not in [0, {self.size})")
        check_shardable(self.full, self.size)

    @property
    def local_heads(self) -> int:
        return self.full.num_heads // self.size

    @property
    def local_kv_heads(self) -> int:
        return max(self.full.num_kv_heads // self.size, 1)

    @property
    def first_kv_head(self) -> int:
        kv = self.full.num_kv_heads
        return self.rank * kv // self.size if kv < self.size else self.rank * self.local_kv_heads

    @property
    def kv_replicas(self) -> int:
        """Ranks holding each KV head (1 unless there are fewer KV heads than ranks)."""
        return max(self.size // self.full.num_kv_heads, 1)

    @property
    def vocab_rows(self) -> int:
        """Vp: rows of the embedding and LM head on every rank (padded)."""
        return -(-self.full.vocab_size // self.size)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_rows

    def local_config(self) -> ModelConfig:
        """The config whose modules hold this rank's share (the vocabulary stays whole:
        the vocabulary-parallel modules shard it themselves)."""
        cfg, n = self.full, self.size
        return replace(
            cfg,
            num_heads=self.local_heads,
            num_kv_heads=self.local_kv_heads,
            intermediate_size=cfg.intermediate_size // n,
            moe_intermediate_size=cfg.moe_intermediate_size // n,
            shared_expert_intermediate_size=cfg.shared_expert_intermediate_size // n,
        )

    def describe(self) -> str:
        """The layout in words, for logs and metrics."""
        cfg = self.full
        kv = f"{self.local_kv_heads} KV head(s)"
        if self.kv_replicas > 1:
            kv += f" (each replicated on {self.kv_replicas} ranks)"
        experts = f", 1/{self.size} of each of {cfg.num_experts} experts" if cfg.is_moe else ""
        return (
            f"{self.size} ranks, each with {self.local_heads} query heads, {kv}, "
            f"{self.vocab_rows} vocabulary rows, 1/{self.size} of each MLP{experts}"
        )
