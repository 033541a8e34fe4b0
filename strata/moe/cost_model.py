"""When is computing a missing expert on the CPU cheaper than copying it to the GPU?

Measured once at start-up (Fiddler / llama.cpp --n-cpu-moe style):
- h2d_bytes_per_s: pinned host-to-device copy bandwidth, timed on one expert-sized copy;
- cpu_seconds[n]: one expert's MLP on the CPU for n tokens, for n in TOKEN_COUNTS
  (interpolated linearly in between, extrapolated per token beyond the last).

    copy cost(e)     = expert_bytes / h2d_bytes_per_s
    cpu cost(e, n)   = cpu_seconds(n) + 2 * n * hidden * elt / h2d_bytes_per_s
                       (activations down and results back)

A miss is computed on the CPU when its cpu cost is below its copy cost.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from strata.models.routed_experts import expert_forward
from strata.moe.host_store import HostExpertStore
from strata.timing import median_seconds

TOKEN_COUNTS = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class OffloadCostModel:
    h2d_bytes_per_s: float
    expert_bytes: int
    activation_bytes_per_token: int
    cpu_seconds: tuple[tuple[int, float], ...]  # (tokens, seconds), tokens ascending

    def copy_seconds(self) -> float:
        return self.expert_bytes / self.h2d_bytes_per_s

    def cpu_compute_seconds(self, num_tokens: int) -> float:
        points = self.cpu_seconds
        for (n0, t0), (n1, t1) in itertools.pairwise(points):
            if num_tokens <= n1:
                frac = max(0.0, (num_tokens - n0) / (n1 - n0))
                t = t0 + frac * (t1 - t0)
                break
        else:
            n_last, t_last = points[-1]
            t = t_last * num_tokens / n_last
        moved = 2 * num_tokens * self.activation_bytes_per_token
        return t + moved / self.h2d_bytes_per_s

    def cpu_is_cheaper(self, num_tokens: int) -> bool:
        return self.cpu_compute_seconds(num_tokens) < self.copy_seconds()

    def max_cpu_tokens(self) -> int:
        """The largest token count for which the CPU wins (0: never)."""
        best = 0
        for n in range(1, TOKEN_COUNTS[-1] * 8 + 1):
            if self.cpu_is_cheaper(n):
                best = n
        return best

    def describe(self) -> str:
        pts = ", ".join(f"{n} tok {t * 1e3:.2f} ms" for n, t in self.cpu_seconds)
        return (
            f"H2D {self.h2d_bytes_per_s / 1e9:.1f} GB/s, expert copy "
            f"{self.copy_seconds() * 1e3:.2f} ms; CPU expert MLP {pts}; CPU wins up to "
            f"{self.max_cpu_tokens()} tokens per expert"
        )


def measure_cost_model(
    store: HostExpertStore, device: torch.device, repeats: int = 5
) -> OffloadCostModel:
    """Time one expert's copy to `device` and its MLP on the CPU at TOKEN_COUNTS tokens."""
    layer = store.layers[0]
    dst = torch.empty(store.expert_numel, dtype=store.dtype, device=device)
    if device.type == "cuda":

        def sync() -> None:
            torch.cuda.synchronize(device)
    else:

        def sync() -> None:
            return None

    copy_s = median_seconds(lambda: store.copy_into(layer, 0, dst), sync, repeats)
    gate_up, down = store.expert(layer, 0)
    points = []
    for n in TOKEN_COUNTS:
        x = torch.randn(n, store.hidden_size, dtype=store.dtype)
        run = lambda x=x: expert_forward(x, gate_up, down)  # noqa: E731
        points.append((n, median_seconds(run, lambda: None, repeats)))
    elt = store.dtype.itemsize
    return OffloadCostModel(
        h2d_bytes_per_s=store.expert_bytes / max(copy_s, 1e-9),
        expert_bytes=store.expert_bytes,
        activation_bytes_per_token=store.hidden_size * elt,
        cpu_seconds=tuple(points),
    )
