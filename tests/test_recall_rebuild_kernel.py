"""The rebuilt-keys kernel (strata/ops/triton_rebuild_keys.py), under Triton's interpreter:
it writes exactly what the torch path writes (ShadowKVPolicy.rebuilt_keys, scattered into
the slots), and by hand: outliers exact, other blocks RoPE(factors @ basis) at their
positions, unmoved slots untouched, rows and heads at their own offsets."""

from __future__ import annotations

import pytest
import torch

from strata.kv.recall.geometry import SINK_BLOCKS
from strata.kv.recall.policy import RecallPolicy
from strata.kv.recall.working_set import Moves
from strata.ops.rotate_half import rotate_half
from tests.test_recall_shadowkv import BLOCK, rotary, rotate, shadowkv
from tests.triton_interpret import interpreted

KERNEL = "strata.ops.triton_rebuild_keys"


def test_a_fitted_policy_rebuilds_as_the_torch_path() -> None:
    torch.manual_seed(0)
    kv_heads, dim, blocks, slots = 2, 32, 10, 6  # one outlier per head
    policy = shadowkv(kv_heads, dim, blocks, slots)
    keys = rotate(policy.rope, torch.randn(kv_heads, blocks, BLOCK, dim))  # type: ignore[arg-type]
    policy.summarize(0, 0, keys[:, :8])
    policy.take_all_keys(0, keys[:, :8])
    policy.summarize(0, 8, keys[:, 8:])  # projected on the fitted basis
    outliers = policy.outliers[0][:, 0].tolist()
    moves = Moves(
        blocks=torch.tensor([[9, outliers[0], 4, 0], [2, 9, outliers[1], 7]]),
        slots=torch.tensor([[5, 0, 3, 1], [1, 4, 2, 0]]),
        mask=torch.tensor([[True, True, False, True], [True, True, True, False]]),
    )
    start = torch.randn(kv_heads, slots, BLOCK, dim)
    expected, got = start.clone(), start.clone()
    assert RecallPolicy.write_rebuilt_keys(policy, 0, moves, expected)  # the torch path
    with interpreted(KERNEL) as module:
        policy.rebuild_into(module.rebuild_keys, 0, moves, got)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[0, 0], keys[0, outliers[0]])  # exact, copied
    assert torch.equal(got[0, 3], start[0, 3]) and torch.equal(got[1, 0], start[1, 0])


def page_case(
    rows: int, kvh: int, model_heads: int, dim: int, rank: int, picks: int, slots: int,
    num_outliers: int, dtype: torch.dtype, device: str,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:  # fmt: skip
    """The kernel's arguments for random page rows (this rank's heads: every other one of
    the model's), the slots expected after it (by hand, rounding the low-rank product to
    `dtype` as the torch path does), and which slots it must leave untouched."""
    room = max(12, picks)  # blocks a row has (picks are distinct)
    rope = rotary(dim)
    a = {
        "factors": torch.randn(rows, room * BLOCK, rank),
        "basis": torch.randn(rows, rank, model_heads * dim) / rank**0.5,
        "cos": rope.cos, "sin": rope.sin,
        "outliers": torch.randint(0, room, (rows, kvh, num_outliers)),
        "outlier_keys": torch.randn(rows, kvh, num_outliers, BLOCK, dim),
        "blocks": torch.stack([torch.randperm(room)[:picks] for _ in range(rows * kvh)]),
        "slots": torch.stack([torch.randperm(slots)[:picks] for _ in range(rows * kvh)]),
        "mask": torch.rand(rows, kvh, picks) < 0.7,
        "heads": torch.arange(1, 2 * kvh, 2),
        "out": torch.randn(rows, kvh, slots, BLOCK, dim),
    }  # fmt: skip
    a["blocks"], a["slots"] = a["blocks"].view(rows, kvh, picks), a["slots"].view(rows, kvh, picks)
    if num_outliers:
        a["blocks"][0, 1, 2] = a["outliers"][0, 1, 1]
        a["blocks"][1, 0, 0] = a["outliers"][1, 0, 2 % num_outliers]
        a["mask"][0, 1, 2] = a["mask"][1, 0, 0] = True
    for name in ("factors", "basis", "outlier_keys", "out"):
        a[name] = a[name].to(dtype)
    expected, untouched = a["out"].clone(), torch.ones(rows, kvh, slots, dtype=torch.bool)
    for r, h, i in a["mask"].nonzero().tolist():
        b, s = int(a["blocks"][r, h, i]), int(a["slots"][r, h, i])
        untouched[r, h, s] = False
        hits = (a["outliers"][r, h] == b).nonzero()
        if len(hits):
            expected[r, h, s] = a["outlier_keys"][r, h, int(hits[0])]
            continue
        head = int(a["heads"][h])
        pre = (a["factors"][r, b * BLOCK : (b + 1) * BLOCK] @ a["basis"][r][:, head * dim :][
            :, :dim]).float()  # fmt: skip
        at = torch.arange((b + SINK_BLOCKS) * BLOCK, (b + SINK_BLOCKS + 1) * BLOCK)
        expected[r, h, s] = (pre * a["cos"][at] + rotate_half(pre) * a["sin"][at]).to(dtype)
    moved = {k: v.to(device) for k, v in a.items()}
    return moved, expected.to(device), untouched.to(device)


@pytest.mark.parametrize("num_outliers", [3, 0])
def test_page_rows_heads_and_a_partial_rank_chunk(num_outliers: int) -> None:
    """Two page rows, this rank's heads 1 and 3 of the model's 4, rank 40 (a partial chunk
    of the kernel's 32 rank columns)."""
    torch.manual_seed(1)
    a, expected, untouched = page_case(2, 2, 4, 32, 40, 5, 7, num_outliers, torch.float32, "cpu")
    with interpreted(KERNEL) as module:
        module.rebuild_keys(**a, sink_blocks=SINK_BLOCKS)
    torch.testing.assert_close(a["out"], expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(a["out"][untouched], expected[untouched])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiles the kernel for a GPU")
def test_the_compiled_kernel_on_the_8b_shape() -> None:
    """bf16, 8 of 16 model heads of 128 dims, rank 160, as a page of 3 rows on the 8B shape
    (within one bf16 rounding of the product: the sums' order differs)."""
    from strata.ops.triton_rebuild_keys import rebuild_keys

    torch.manual_seed(2)
    a, expected, untouched = page_case(3, 8, 16, 128, 160, 24, 32, 6, torch.bfloat16, "cuda")
    rebuild_keys(**a, sink_blocks=SINK_BLOCKS)
    torch.testing.assert_close(a["out"], expected, atol=3e-2, rtol=2e-2)
    assert torch.equal(a["out"][untouched], expected[untouched])


def test_geometry_the_kernel_cannot_take_is_refused() -> None:
    from strata.ops.triton_rebuild_keys import fits

    assert fits(16, 128) and fits(16, 32)
    assert not fits(8, 128) and not fits(16, 16) and not fits(16, 96)


def test_the_kernel_refuses_what_it_cannot_take() -> None:
    """Before any launch: a geometry it does not fit, and a row it cannot address."""
    from strata.ops.triton_rebuild_keys import rebuild_keys

    a, _, _ = page_case(2, 2, 4, 32, 40, 5, 7, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match="power-of-two blocks >= 16 and dims >= 32, got 16 x 16"):
        rebuild_keys(**{**a, "out": a["out"][..., :16]}, sink_blocks=SINK_BLOCKS)
    with pytest.raises(ValueError, match="each row of factors contiguous"):
        rebuild_keys(**{**a, "factors": a["factors"].transpose(1, 2).contiguous().transpose(1, 2)},
                     sink_blocks=SINK_BLOCKS)  # fmt: skip
