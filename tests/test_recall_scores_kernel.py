"""The block scores kernel (strata/ops/triton_block_scores.py), under Triton's
interpreter, against the torch path both policies run (policy.block_probabilities): quest's
one summary a block and shadowkv's chunks, pages whose rows have different live block
counts (none, some, all), one sequence's own scores (no rows), GQA groups that are not a
power of two, and several tiles."""

from __future__ import annotations

import pytest
import torch

from strata.kv.recall.policy import block_probabilities
from tests.triton_interpret import interpreted

KERNEL = "strata.ops.triton_block_scores"


@pytest.mark.parametrize(
    ("lead", "kvh", "group", "blocks", "per_block", "live"),
    [
        ((3,), 2, 4, 40, 1, (0, 17, 40)),
        ((2,), 2, 3, 300, 2, (299, 1)),
        ((4,), 1, 1, 9, 4, (9, 3, 5, 1)),
        ((), 3, 4, 1100, 1, None),  # a sequence's own: more blocks than one tile
        ((), 2, 2, 20, 2, (7,)),
    ],
)
def test_the_kernel_scores_as_the_torch_path(
    lead: tuple[int, ...], kvh: int, group: int, blocks: int, per_block: int,
    live: tuple[int, ...] | None,
) -> None:  # fmt: skip
    torch.manual_seed(blocks)
    logits = torch.randn(*lead, kvh, group, blocks * per_block) * 4
    counts = None if live is None else torch.tensor(live).view(lead)
    want = block_probabilities(logits, counts, 0.125, per_block, kernel=False)
    with interpreted(KERNEL) as module:
        got = module.block_scores(logits, counts, 0.125, per_block)
    assert got.shape == want.shape == (*lead, kvh, blocks) and got.dtype == torch.float32
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-7)


def test_logits_the_kernel_cannot_take_are_refused() -> None:
    with interpreted(KERNEL) as module:
        with pytest.raises(ValueError, match="whole power-of-two blocks"):
            module.block_scores(torch.randn(2, 4, 12), None, 1.0, 3)
        with pytest.raises(ValueError, match="whole power-of-two blocks"):
            module.block_scores(torch.randn(2, 4, 12).transpose(0, 1), None, 1.0, 1)
        with pytest.raises(ValueError, match="one count a row"):
            module.block_scores(torch.randn(3, 2, 4, 8), torch.tensor([1, 2]), 1.0, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("per_block", [1, 2])
def test_the_compiled_kernel_on_the_8b_shape(per_block: int) -> None:
    """A page of 6 rows at 128k tokens: 8 KV heads of 4 query heads, 8,192 blocks (quest)
    or 16,384 chunks of 8 tokens (shadowkv), bf16 logits."""
    from strata.ops.triton_block_scores import block_scores

    torch.manual_seed(0)
    logits = (torch.randn(6, 8, 4, 8192 * per_block, device="cuda") * 4).to(torch.bfloat16)
    live = torch.tensor([8192, 8000, 100, 1, 0, 4096], device="cuda")
    want = block_probabilities(logits, live, 128**-0.5, per_block, kernel=False)
    got = block_scores(logits, live, 128**-0.5, per_block)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-9)
