"""Host cost of the summaries a retiring recall step makes: layer by layer, or every
sparse layer at once (RecallPolicy.summarize_layers), on the CPU.

    python benchmarks/recall_summary_ops.py [--layers 30] [--kv-heads 8] [--head-dim 128]

One block leaves a sequence's tail in each of `layers` sparse layers (the Llama-3-8B
shape: 30 sparse layers, 8 KV heads of 128 dims, 16-token blocks), and the policy
records it. Counts the aten ops each way (on a GPU, each is a kernel launch from the
host) and times them on this machine's CPU (median of 20).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig

from strata.kv.recall.policy import RecallPolicy, SummaryRoom
from strata.kv.recall.quest import QuestPolicy
from strata.kv.recall.shadowkv import ShadowKVPolicy
from strata.models.rope import RotaryEmbedding

VIEWS = {"view", "expand", "slice", "select", "unsqueeze", "squeeze", "_unsafe_view", "t",
         "transpose", "permute", "as_strided", "alias", "detach", "unbind", "split",
         "_reshape_alias", "lift_fresh"}  # fmt: skip


class OpCount(TorchDispatchMode):
    """Counts aten ops (`ops`), and those that are not views (`kernels`: on a GPU each
    is a kernel launch)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.kernels = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += 1
        self.kernels += func.overloadpacket.__name__ not in VIEWS
        return func(*args, **(kwargs or {}))


def policy_for(name: str, room: SummaryRoom, dim: int) -> RecallPolicy:
    config = LlamaConfig(hidden_size=dim * 4, num_attention_heads=4, rope_theta=500000.0)
    rope = RotaryEmbedding(config, dim, max_positions=(room.max_blocks + 2) * room.block_size)
    policy: RecallPolicy = ShadowKVPolicy() if name == "shadowkv" else QuestPolicy()
    policy.allocate(room, rope)
    if isinstance(policy, ShadowKVPolicy):
        policy.fitted = [True] * room.layers  # every basis fitted, as in a decode
    return policy


def measure(fn: Callable[[], None]) -> tuple[int, float]:
    with OpCount() as count:
        fn()
    times = []
    for _ in range(20):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return count.ops, statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=30, help="sparse layers")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    a = p.parse_args()
    blocks, bs = 64, 16
    room = SummaryRoom(a.layers, a.kv_heads, blocks, a.head_dim, bs, torch.bfloat16, 128)
    keys = torch.randn(a.layers, a.kv_heads, 1, bs, a.head_dim).to(torch.bfloat16)
    first = 40  # earlier blocks summarized: outliers are kept and compared
    print(f"{a.layers} sparse layers, {a.kv_heads} KV heads of {a.head_dim}, one block each")
    print("policy     layer by layer           all at once")
    for name in ("quest", "shadowkv"):
        policy = policy_for(name, room, a.head_dim)
        policy.summarize_layers(slice(0, a.layers), 0, torch.randn(
            a.layers, a.kv_heads, first, bs, a.head_dim).to(torch.bfloat16))  # fmt: skip

        def per_layer(policy: RecallPolicy = policy) -> None:
            for layer in range(a.layers):
                policy.summarize(layer, first, keys[layer])

        def at_once(policy: RecallPolicy = policy) -> None:
            policy.summarize_layers(slice(0, a.layers), first, keys)

        (ops1, t1), (ops2, t2) = measure(per_layer), measure(at_once)
        print(f"{name:<10} {ops1:>5} ops {t1 * 1e3:>7.2f} ms   {ops2:>5} ops {t2 * 1e3:>7.2f} ms")


if __name__ == "__main__":
    main()
