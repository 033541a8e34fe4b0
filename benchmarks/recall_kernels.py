"""One sparse layer's recall work on the GPU, torch path against the fused Triton kernels:
shadowkv's rebuilt keys (strata/ops/triton_rebuild_keys.py), the working-set update
(strata/ops/triton_working_set.py), the fetch from pinned host rows (fetch_blocks in
strata/ops/triton_row_copy.py), the page's decode attention
(strata/ops/triton_page_attention.py) and the policies' block scores
(strata/ops/triton_block_scores.py), on the Llama-3-8B shape as a page of --rows rows (8 KV
heads of 128 dims, 16-token blocks, 128 picks of 8,192 blocks at 128k, rank 160). Each
kernel's switch (recall_switches.py) is on only while its arm runs.

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
from unittest import mock

import torch
from transformers import LlamaConfig

from strata.kv.recall import fetch
from strata.kv.recall.buffers import OwnBuffers
from strata.kv.recall.page_decode import attend
from strata.kv.recall.policy import RecallPolicy, SummaryRoom, block_probabilities
from strata.kv.recall.shadowkv import ShadowKVPolicy
from strata.kv.recall.working_set import Moves, WorkingSet
from strata.models.rope import RotaryEmbedding

sys.path.insert(0, str(Path(__file__).parent))
from recall_switches import switched

KVH, DIM, BS, BLOCKS, PICKS = 8, 128, 16, 8192, 128


def count_ops(rows: int, slots: int, blocks: int = 1024) -> dict[str, int]:
    """Aten ops other than views that one sparse layer's torch paths run (CPU)."""
    from recall_summary_ops import OpCount

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
    host = torch.zeros(2 * blocks * KVH, BS * DIM)
    store = SimpleNamespace(num_slots=blocks, flat=lambda: host)
    table = torch.stack([torch.randperm(blocks) for _ in range(rows)])
    rows_out = torch.zeros(rows * KVH * slots, BS * DIM)
    # the copy itself (one kernel on a GPU, indexing ops here) is left out: its indices only
    with mock.patch.object(fetch, "copy_rows", lambda *_: None), OpCount() as count:
        fetch.copy_moves(store, table, 1, moves, rows_out, slots)  # type: ignore[arg-type]
    counts["fetch_indices"] = count.kernels
    parts = (torch.randn(rows, 4 * KVH, DIM), *torch.randn(2, rows, KVH, BS, DIM).unbind(0),
             *torch.randn(2, rows, KVH, slots, BS, DIM).unbind(0),
             torch.ones(rows, KVH, slots, dtype=torch.bool),
             *torch.randn(2, rows, KVH, 48, DIM).unbind(0), torch.zeros(rows, dtype=torch.long))
    with OpCount() as count:
        attend(*parts, 0.1, kernel=False)
    counts["attention"] = count.kernels
    logits, live = torch.randn(rows, KVH, 4, 2 * blocks), torch.full((rows,), blocks)
    with OpCount() as count:
        block_probabilities(logits, live, 0.1, 2, kernel=False)
    counts["scores"] = count.kernels
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


def distinct(rows: int, upto: int) -> torch.Tensor:
    """[rows, KVH, PICKS] on the GPU: per head, PICKS distinct ids below `upto`."""
    return torch.stack([torch.randperm(upto, device="cuda")[:PICKS]
                        for _ in range(rows * KVH)]).view(rows, KVH, PICKS)  # fmt: skip


def moves_of(rows: int, slots: int) -> Moves:
    """Random moves of a page: 80% of the picks missed."""
    return Moves(distinct(rows, BLOCKS), distinct(rows, slots),
                 torch.rand(rows, KVH, PICKS, device="cuda") < 0.8)  # fmt: skip


def timed(arm: str, run: Callable[[], object]) -> dict[str, float]:
    """`run` timed with the switch off (the torch path) and on (the kernel)."""
    times = {}
    for on, name in ((False, "torch_ms"), (True, "kernel_ms")):
        with switched(arm, on):
            times[name] = median_ms(run)
    return times


def rebuild(rows: int, slots: int) -> dict[str, float]:
    policy = shadowkv_page(rows, slots, BLOCKS, torch.bfloat16, torch.device("cuda"))
    moves = moves_of(rows, slots)
    out = [torch.zeros(rows, KVH, slots, BS, DIM, dtype=torch.bfloat16, device="cuda")
           for _ in range(2)]  # fmt: skip
    for on in (False, True):
        with switched("rebuild_kernel", on):
            policy.write_rebuilt_keys(0, moves, out[on])
    torch.testing.assert_close(out[1].float(), out[0].float(), atol=3e-2, rtol=2e-2)
    return timed("rebuild_kernel", lambda: policy.write_rebuilt_keys(0, moves, out[0]))


def update(rows: int, slots: int) -> dict[str, float]:
    cuda = torch.device("cuda")
    sets = [WorkingSet(1, KVH, slots, BS, DIM, torch.bfloat16, cuda, OwnBuffers(cuda, rows))
            for _ in range(2)]  # fmt: skip
    selected, active = distinct(rows, BLOCKS), torch.ones(rows, dtype=torch.bool, device="cuda")
    results = []
    for on in (False, True):
        with switched("update_kernel", on):
            results.append(sets[on].update(0, selected, active))
    (plain, plain_moves), (fused, fused_moves) = results
    assert torch.equal(plain, fused) and torch.equal(plain_moves.slots, fused_moves.slots)
    assert torch.equal(sets[0].tag, sets[1].tag) and torch.equal(sets[0].age, sets[1].age)
    return timed("update_kernel", lambda: sets[0].update(0, selected, active))


def fetch_rows(rows: int, slots: int) -> dict[str, float]:
    """The values of a page's moves from a pinned host store of 8,192 slots a layer."""
    host = torch.randn(2 * BLOCKS * KVH, BS * DIM).to(torch.bfloat16).pin_memory()
    store = SimpleNamespace(num_slots=BLOCKS, flat=lambda: host)
    # each row's host slot of each block
    table = torch.stack([torch.randperm(BLOCKS, device="cuda") for _ in range(rows)])
    moves = moves_of(rows, slots)
    out = [torch.zeros(rows * KVH * slots, BS * DIM, dtype=torch.bfloat16, device="cuda")
           for _ in range(2)]  # fmt: skip
    for on in (False, True):
        with switched("fetch_kernel", on):
            fetch.copy_moves(store, table, 1, moves, out[on], slots)  # type: ignore[arg-type]
    assert torch.equal(out[0], out[1])
    return timed("fetch_kernel",
                 lambda: fetch.copy_moves(store, table, 1, moves, out[0], slots))  # type: ignore[arg-type]


def checked_and_timed(run: Callable[[bool], torch.Tensor], atol: float, rtol: float
                      ) -> dict[str, float]:  # fmt: skip
    """`run(kernel)` (a path picked by argument, not by switch): the kernel's result
    checked against the torch path's, then each timed."""
    torch.testing.assert_close(run(True).float(), run(False).float(), atol=atol, rtol=rtol)
    return {name: median_ms(lambda on=on: run(on))
            for on, name in ((False, "torch_ms"), (True, "kernel_ms"))}  # fmt: skip


def attention(rows: int, slots: int) -> dict[str, float]:
    """A page's decode attention over a one-block sink, the slots (90% attended) and a
    48-token tail: concatenated and masked, against the kernel reading them in place."""
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    q = torch.randn(rows, 4 * KVH, DIM, device=cuda, dtype=bf16)
    sink = torch.randn(2, rows, KVH, BS, DIM, device=cuda, dtype=bf16).unbind(0)
    ws = torch.randn(2, rows, KVH, slots, BS, DIM, device=cuda, dtype=bf16).unbind(0)
    tail = torch.randn(2, rows, KVH, 48, DIM, device=cuda, dtype=bf16).unbind(0)
    attended = torch.rand(rows, KVH, slots, device=cuda) < 0.9
    held = torch.randint(0, 48, (rows,), device=cuda)
    parts = (q, sink[0], sink[1], ws[0], ws[1], attended, tail[0], tail[1], held, DIM**-0.5)
    return checked_and_timed(lambda on: attend(*parts, kernel=on), atol=3e-2, rtol=2e-2)


def scores(rows: int, per_block: int) -> dict[str, float]:
    """A page's block scores at 128k from bf16 logits: per_block 1 is quest's (8,192
    blocks), 2 shadowkv's (16,384 chunks of 8 tokens)."""
    cuda = torch.device("cuda")
    logits = torch.randn(rows, KVH, 4, BLOCKS * per_block, device=cuda).to(torch.bfloat16)
    live = torch.full((rows,), BLOCKS - 3, device=cuda)
    return checked_and_timed(
        lambda on: block_probabilities(logits, live, DIM**-0.5, per_block, on), atol=1e-9,
        rtol=1e-4,
    )  # fmt: skip


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
               "rebuild": rebuild(a.rows, a.slots), "update": update(a.rows, a.slots),
               "fetch": fetch_rows(a.rows, a.slots),
               "attention": attention(a.rows, a.slots), "scores_quest": scores(a.rows, 1),
               "scores_shadowkv": scores(a.rows, 2)}  # fmt: skip
    print(f"{results['gpu']}, a page of {a.rows} rows, {a.slots} slots, one sparse layer:")
    for name in ("rebuild", "update", "fetch", "attention", "scores_quest", "scores_shadowkv"):
        r = results[name]
        print(f"  {name:<16} torch {r['torch_ms']:.3f} ms  kernel {r['kernel_ms']:.3f} ms  "
              f"({r['torch_ms'] / r['kernel_ms']:.1f}x)")  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
