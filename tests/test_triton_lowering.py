"""Triton's compiler front end over the recall kernels, on the CPU (triton_frontend.py):
each wrapper's launches lower to Triton IR for sm_90 with the 8B shape's dtypes and
sizes. The interpreter tests check what the kernels compute; these check what only the
compiler checks (names of one type in both branches of an `if`, constexpr globals)."""

from __future__ import annotations

import pytest
import torch

from strata.kv.recall.geometry import SINK_BLOCKS
from strata.kv.recall.working_set import NEVER
from tests.test_recall_rebuild_kernel import page_case
from tests.triton_frontend import lower

pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
BF16 = torch.bfloat16


def kernels_lowered(module_name: str, call: object) -> dict[str, int]:
    import importlib

    module = importlib.import_module(module_name)
    irs = lower(module, lambda: call(module))  # type: ignore[operator]
    assert all("tt.func" in ir for launches in irs.values() for ir in launches)
    return {name: len(launches) for name, launches in irs.items()}


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_rebuilt_keys_lower(dtype: torch.dtype) -> None:
    a, _, _ = page_case(3, 8, 16, 128, 160, 24, 32, 6, dtype, "cpu")
    call = lambda m: m.rebuild_keys(**a, sink_blocks=SINK_BLOCKS)  # noqa: E731
    assert kernels_lowered("strata.ops.triton_rebuild_keys", call) == {"_rebuild_keys_kernel": 1}


def test_the_working_set_update_lowers() -> None:
    rows, kvh, picks, slots = 4, 8, 128, 128
    selected = torch.stack([torch.randperm(8192)[:picks] for _ in range(rows * kvh)])
    tag = torch.full((rows, kvh, slots), -1)
    args = (selected.view(rows, kvh, picks), tag, torch.zeros_like(tag),
            torch.ones(rows, dtype=torch.bool), torch.zeros(rows, dtype=torch.long),
            torch.zeros(rows, dtype=torch.long), NEVER)  # fmt: skip
    call = lambda m: m.update_slots(*args)  # noqa: E731
    assert kernels_lowered("strata.ops.triton_working_set", call) == {"_update_kernel": 1}


def test_the_fetch_lowers() -> None:
    rows, kvh, picks, slots, num_slots = 4, 8, 128, 128, 8192
    host = torch.zeros(2 * num_slots * kvh, 16 * 128, dtype=BF16)
    table = torch.stack([torch.randperm(num_slots) for _ in range(rows)])
    blocks = torch.randint(0, num_slots, (rows, kvh, picks))
    dst = torch.zeros(rows * kvh * slots, 16 * 128, dtype=BF16)
    call = lambda m: m.fetch_blocks(host, dst, table, num_slots, blocks, blocks % slots,  # noqa: E731
                                    blocks > 10, slots)  # fmt: skip
    assert kernels_lowered("strata.ops.triton_row_copy", call) == {"_fetch_blocks_kernel": 1}


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_the_page_attention_lowers(dtype: torch.dtype) -> None:
    rows, kvh, d, slots, bs = 6, 8, 128, 128, 16
    q = torch.randn(rows, 4 * kvh, d, dtype=dtype)
    sink = torch.randn(rows, kvh, bs, d, dtype=dtype)
    tail = torch.randn(rows, kvh, 48, d, dtype=dtype)
    ws = torch.randn(rows, kvh, slots, bs, d, dtype=dtype)
    attended = torch.ones(rows, kvh, slots, dtype=torch.bool)
    held = torch.zeros(rows, dtype=torch.long)
    call = lambda m: m.page_attention(q, sink, sink, ws, ws, attended, tail, tail, held, 0.1)  # noqa: E731
    lowered = kernels_lowered("strata.ops.triton_page_attention", call)
    assert lowered == {"_page_attention_kernel": 1, "_merge_kernel": 1}


@pytest.mark.parametrize("per_block", [1, 2])
def test_the_block_scores_lower(per_block: int) -> None:
    logits = torch.randn(6, 8, 4, 8192 * per_block, dtype=BF16)
    live = torch.full((6,), 8000)
    call = lambda m: m.block_scores(logits, live, 0.1, per_block)  # noqa: E731
    assert kernels_lowered("strata.ops.triton_block_scores", call) == {"_block_scores_kernel": 1}
