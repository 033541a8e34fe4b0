"""One sparse layer's recall work on the GPU, torch path against the fused Triton kernels:
shadowkv's rebuilt keys (strata/ops/triton_rebuild_keys.py) and the working-set update
(strata/ops/triton_working_set.py), on the Llama-3-8B shape as a page of --rows rows (8 KV
heads of 128 dims, 16-token blocks, 128 picks of 8,192 blocks at 128k, rank 160).

    python benchmarks/recall_kernels.py [--rows 4] [--slots 128] [--json F]
    python benchmarks/recall_kernels.py --count      (on the CPU)

Times each way with CUDA events (median of 50 calls, after a warm-up; launches included,
as the engine's eager steps pay them) and checks the kernel's result against the torch
path's first. --count counts instead, on the CPU, the aten ops other than views (each a
kernel launch on a GPU) that each torch path runs for one sparse layer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import LlamaConfig

from strata.kv.recall.buffers import OwnBuffers
from strata.kv.recall.policy import RecallPolicy, SummaryRoom
from strata.kv.recall.shadowkv import ShadowKVPolicy
from strata.kv.recall.working_set import Moves, WorkingSet
from strata.models.rope import RotaryEmbedding

KVH, DIM, BS, BLOCKS, PICKS = 8, 128, 16, 8192, 128


def count_ops(rows: int, slots: int, blocks: int = 1024) -> dict[str, int]:
    """Aten ops other than views that one sparse layer's torch paths run (CPU)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from recall_summary_ops import OpCount

    from strata.kv.recall.fetch import copy_moves

    ws = WorkingSet(1, KVH, slots, BS, DIM, torch.float32, None, OwnBuffers(None, rows))
    selected = torch.stack([torch.randperm(blocks)[:PICKS] for _ in range(rows * KVH)])
    counts, on = {}, torch.ones(rows, dtype=torch.bool)
    selected = selected.view(rows, KVH, PICKS)
    with OpCount() as count:
        _, moves = ws.update(0, selected, on)
    counts["update"] = count.kernels
    policy = shadowkv_page(rows, slots, blocks, torch.float32, torch.device("cpu"))
    keys = torch.zeros(rows, KVH, slots, BS, DIM)
    with OpCount() as count:
        RecallPolicy.write_rebuilt_keys(policy, 0, moves, keys)
    counts["rebuild"] = count.kernels
    store = SimpleNamespace(num_slots=blocks, flat=lambda: torch.zeros(2 * blocks * KVH, BS * DIM))
    table = torch.stack([torch.randperm(blocks) for _ in range(rows)])
    copy = torch.cuda.is_available()  # on the CPU the copy is 4 indexing ops, not one kernel
    rows_out = torch.zeros(rows * KVH * slots, BS * DIM)
    with OpCount() as count:
        copy_moves(store, table, 1, moves, rows_out, slots)  # type: ignore[arg-type]
    counts["fetch_indices"] = count.kernels - (1 if copy else 4)
    return counts


def shadowkv_page(
    rows: int, slots: int, blocks: int, dtype: torch.dtype, device: torch.device
) -> ShadowKVPolicy:
    """A fitted shadowkv policy over a page of `rows` rows, random summaries (their values
    do not change the work)."""
    config = LlamaConfig(hidden_size=DIM * 32, num_attention_heads=32, rope_theta=500000.0)
    rope = RotaryEmbedding(config, DIM, max_positions=(blocks + 2) * BS).to(device)
    room = SummaryRoom(1, KVH, blocks, DIM, BS, dtype, slots, device=device)
    policy = ShadowKVPolicy()
    policy.allocate(room, rope, OwnBuffers(device, rows))
    policy.for_page()
    policy.factors.normal_()
    policy.basis.normal_(std=160**-0.5)
    return policy


def median_ms(fn: Callable[[], object], calls: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def picks(rows: int, slots: int) -> torch.Tensor:
    return torch.stack([torch.randperm(BLOCKS, device="cuda")[:PICKS]
                        for _ in range(rows * KVH)]).view(rows, KVH, PICKS)  # fmt: skip


def rebuild(rows: int, slots: int) -> dict[str, float]:
    policy = shadowkv_page(rows, slots, BLOCKS, torch.bfloat16, torch.device("cuda"))
    blocks = picks(rows, slots)
    moves = Moves(blocks, torch.stack([torch.randperm(slots, device="cuda")[:PICKS]
                                       for _ in range(rows * KVH)]).view(rows, KVH, PICKS),
                  torch.rand(rows, KVH, PICKS, device="cuda") < 0.8)  # fmt: skip
    slots_torch = torch.zeros(rows, KVH, slots, BS, DIM, dtype=torch.bfloat16, device="cuda")
    slots_kernel = slots_torch.clone()
    torch_path = lambda: RecallPolicy.write_rebuilt_keys(policy, 0, moves, slots_torch)  # noqa: E731
    kernel_path = lambda: policy.write_rebuilt_keys(0, moves, slots_kernel)  # noqa: E731
    torch_path(), kernel_path()
    torch.testing.assert_close(slots_kernel.float(), slots_torch.float(), atol=3e-2, rtol=2e-2)
    return {"torch_ms": median_ms(torch_path), "kernel_ms": median_ms(kernel_path)}


def update(rows: int, slots: int) -> dict[str, float]:
    cuda = torch.device("cuda")
    sets = [WorkingSet(1, KVH, slots, BS, DIM, torch.bfloat16, cuda, OwnBuffers(cuda, rows))
            for _ in range(2)]  # fmt: skip
    selected, active = picks(rows, slots), torch.ones(rows, dtype=torch.bool, device="cuda")

    def run(ws: WorkingSet, kernel: bool) -> tuple[torch.Tensor, Moves]:
        WorkingSet.update_kernel = kernel
        return ws.update(0, selected, active)

    plain, fused = run(sets[0], False), run(sets[1], True)
    assert torch.equal(plain[0], fused[0]) and torch.equal(plain[1].slots, fused[1].slots)
    assert torch.equal(sets[0].tag, sets[1].tag) and torch.equal(sets[0].age, sets[1].age)
    result = {"torch_ms": median_ms(lambda: run(sets[0], False)),
              "kernel_ms": median_ms(lambda: run(sets[1], True))}  # fmt: skip
    WorkingSet.update_kernel = False
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=4, help="rows of the page")
    p.add_argument("--slots", type=int, default=128, help="working-set slots per head")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--count", action="store_true",
                   help="count each torch path's ops for one layer on the CPU instead")
    a = p.parse_args()
    if a.count:
        counts = count_ops(a.rows, a.slots)
        print(f"aten ops other than views, one sparse layer, a page of {a.rows} rows: {counts}")
        return
    if not torch.cuda.is_available():
        sys.exit("recall_kernels needs a CUDA GPU")
    torch.manual_seed(0)
    results = {"gpu": torch.cuda.get_device_name(), "rows": a.rows, "slots": a.slots,
               "rebuild": rebuild(a.rows, a.slots), "update": update(a.rows, a.slots)}  # fmt: skip
    print(f"{results['gpu']}, a page of {a.rows} rows, {a.slots} slots, one sparse layer:")
    for name in ("rebuild", "update"):
        r = results[name]
        print(f"  {name:<8} torch {r['torch_ms']:.3f} ms  kernel {r['kernel_ms']:.3f} ms  "
              f"({r['torch_ms'] / r['kernel_ms']:.1f}x)")  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
