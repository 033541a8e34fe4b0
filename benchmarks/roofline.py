"""Hardware ceilings measured on the device, and the work a model's step must do.

    copy bandwidth   bytes read + written by a large device-to-device copy, per second
    matmul rate      2 M N K / time of a large bf16 matrix product

A step's floor is max(FLOPs / matmul rate, bytes / copy bandwidth): the bytes are the
weights once plus the KV read and written; the FLOPs are the projections and LM head
(2 per weight per token) plus causal attention (4 * heads * head_dim per query-key pair).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton.testing

from strata.config import ModelConfig
from strata.engine.step_stats import StepStats


@dataclass(frozen=True)
class Ceilings:
    copy_bytes_per_s: float
    matmul_flops_per_s: float


def _median_ms(fn: object) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def _copy_bandwidth(device: torch.device) -> float:
    src = torch.randn(1 << 30, dtype=torch.bfloat16, device=device)  # 2 GiB, far past L2
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def _matmul_rate(device: torch.device, n: int = 8192) -> float:
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=device) for _ in range(2))
    return 2 * n**3 / (_median_ms(lambda: a @ b) * 1e-3)


def measure_ceilings(device: torch.device) -> Ceilings:
    return Ceilings(_copy_bandwidth(device), _matmul_rate(device))


@dataclass(frozen=True)
class ModelWork:
    layer_params: int  # projection weights of all layers
    head_params: int  # LM head weights
    kv_bytes_per_token: int  # K and V of all layers, in the KV dtype
    attn_flops_per_pair: int  # 4 * heads * head_dim * layers
    weight_bytes: int  # bytes read per step: layers + head + norms (embedding rows: ~0)

    @classmethod
    def of(cls, cfg: ModelConfig, element_size: int = 2) -> ModelWork:
        h, inter = cfg.hidden_size, cfg.intermediate_size
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * inter
        layer = per_layer * cfg.num_layers
        head = cfg.vocab_size * h
        return cls(
            layer_params=layer,
            head_params=head,
            kv_bytes_per_token=cfg.kv_bytes_per_token * element_size,
            attn_flops_per_pair=4 * cfg.num_heads * cfg.head_dim * cfg.num_layers,
            weight_bytes=(layer + head) * element_size,
        )

    def step_flops(self, s: StepStats) -> float:
        return (
            2 * self.layer_params * s.tokens
            + 2 * self.head_params * s.sampled
            + self.attn_flops_per_pair * s.attended_pairs
        )

    def step_bytes(self, s: StepStats) -> float:
        return self.weight_bytes + self.kv_bytes_per_token * (s.kv_tokens_read + s.tokens)

    def floor_seconds(self, steps: list[StepStats], ceil: Ceilings) -> float:
        return sum(
            max(
                self.step_flops(s) / ceil.matmul_flops_per_s,
                self.step_bytes(s) / ceil.copy_bytes_per_s,
            )
            for s in steps
        )
