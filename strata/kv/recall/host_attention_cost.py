"""Where is a sampled middle cheaper to attend: on the host, or on the device after
copying its keys and values there? (The MoE offload's cost model, for attention.)

Measured once per compute device, at start-up (build.py) or first use:
- seconds_per_pair: the host attending one sampled (query head, key) pair, timed on
  SAMPLE_PAIRS pairs of head_dim 128 with every importance weight (sampled_attention.py);
- h2d_bytes_per_s: a pinned host-to-device copy of COPY_BYTES (None: the device is the
  host, so the host attends).

    host cost(n)    = n * seconds_per_pair
    device cost(n)  = n * 2 * row_bytes / h2d_bytes_per_s   (its keys and values)

The device's own attention over n rows is a few microseconds, left out.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from strata.timing import median_seconds

REPEATS = 5
SAMPLE_HEADS = 32
SAMPLE_PAIRS = 32 * 2048
HEAD_DIM = 128
COPY_BYTES = 32 << 20


@dataclass(frozen=True)
class HostAttentionCost:
    seconds_per_pair: float
    h2d_bytes_per_s: float | None  # None: the compute device is the host

    def on_host(self, row_bytes: int) -> bool:
        """Whether sampled pairs of row_bytes-long keys are cheaper on the host (both
        costs grow with the pairs alike, so their count decides nothing)."""
        if self.h2d_bytes_per_s is None:
            return True
        return self.seconds_per_pair <= 2 * row_bytes / self.h2d_bytes_per_s

    def describe(self) -> str:
        host = f"host attends {1 / self.seconds_per_pair / 1e6:.1f} M sampled keys/s"
        if self.h2d_bytes_per_s is None:
            return f"{host}; the device is the host"
        side = "host" if self.on_host(2 * HEAD_DIM) else "device"
        return (f"{host}; H2D {self.h2d_bytes_per_s / 1e9:.1f} GB/s; bf16 head_dim "
                f"{HEAD_DIM} samples attended on the {side}")  # fmt: skip


@functools.cache
def host_attention_cost(device: torch.device) -> HostAttentionCost:
    """The cost model of `device` (measured on first call, then kept)."""
    from strata.kv.recall.sampled_attention import sampled_part

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(SAMPLE_HEADS, HEAD_DIM, generator=generator)
    heads = torch.arange(SAMPLE_HEADS).repeat_interleave(SAMPLE_PAIRS // SAMPLE_HEADS)
    keys = torch.randn(SAMPLE_PAIRS, HEAD_DIM, generator=generator).to(torch.bfloat16)
    values = torch.randn(SAMPLE_PAIRS, HEAD_DIM, generator=generator).to(torch.bfloat16)
    mean = torch.zeros(SAMPLE_HEADS, HEAD_DIM)

    def attend() -> None:
        sampled_part(q, heads, keys, values, mean, 1, HEAD_DIM**-0.5, 10, 150)

    per_pair = median_seconds(attend, lambda: None, REPEATS) / SAMPLE_PAIRS
    if device.type != "cuda":
        return HostAttentionCost(per_pair, None)
    host = torch.empty(COPY_BYTES, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
    seconds = median_seconds(lambda: target.copy_(host, non_blocking=True),
                             lambda: torch.cuda.synchronize(device), REPEATS)  # fmt: skip
    return HostAttentionCost(per_pair, COPY_BYTES / seconds)
