"""When preempting, is reloading a sequence's KV from the CPU tier cheaper than recomputing it?

    recompute  ~ tokens / prefill rate              (rate: tokens per second of recent steps)
    reload     ~ blocks * block bytes / load rate + one step (the load lands a step later)

Both rates are running averages of what this engine measured; until it has measured a
step, recompute is assumed (a fresh engine has nothing worth swapping).
"""

from __future__ import annotations

import torch

# Copy rates assumed before a load has been timed: pinned host-to-device on a GPU host,
# a memory copy on a CPU-only one. Replaced by measurements as loads happen.
DEFAULT_LOAD_BYTES_PER_S = {"cuda": 20e9, "cpu": 5e9}


class SwapCostModel:
    def __init__(self, block_bytes: int, block_size: int, device: torch.device) -> None:
        """block_bytes: a block as the cpu tier holds it (coded under a tier codec), the
        bytes its measured load rate counts."""
        self.block_bytes = block_bytes
        self.block_size = block_size
        self.load_bytes_per_s = DEFAULT_LOAD_BYTES_PER_S.get(device.type, 5e9)
        self.tokens_per_s: float | None = None
        self.step_s: float | None = None

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        if seconds <= 0 or num_tokens <= 0:
            return
        rate = num_tokens / seconds
        self.tokens_per_s = (
            rate if self.tokens_per_s is None else 0.8 * self.tokens_per_s + 0.2 * rate
        )
        self.step_s = seconds if self.step_s is None else 0.8 * self.step_s + 0.2 * seconds

    def observe_load_rate(self, bytes_per_s: float | None) -> None:
        if bytes_per_s:
            self.load_bytes_per_s = bytes_per_s

    def swap_is_cheaper(self, num_computed_tokens: int) -> bool:
        if self.tokens_per_s is None or self.step_s is None:
            return False
        recompute_s = num_computed_tokens / self.tokens_per_s
        blocks = num_computed_tokens // self.block_size
        reload_s = blocks * self.block_bytes / self.load_bytes_per_s + self.step_s
        return reload_s < recompute_s
