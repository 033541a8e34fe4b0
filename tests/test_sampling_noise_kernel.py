"""The Triton noise kernel (strata/ops/triton_sampling_noise.py) equals the sampler's torch
hash bit for bit, on CPU under Triton's interpreter (tests/triton_interpret.py)."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from strata.engine.sampler import uniform_noise_torch
from tests.triton_interpret import interpreted

pytest.importorskip("triton")

KERNEL_MODULE = "strata.ops.triton_sampling_noise"


@pytest.fixture(scope="module")
def kernel() -> Iterator[ModuleType]:
    with interpreted(KERNEL_MODULE) as module:
        yield module


def test_kernel_noise_equals_the_torch_hash_bit_for_bit(kernel: ModuleType) -> None:
    seeds = torch.tensor([0, 1, 42, 305, 2**31, 2**32 - 1], dtype=torch.int64)
    steps = torch.tensor([0, 7, 1, 1000, 123456, 2**40], dtype=torch.int64)
    vocab = kernel.BLOCK + 77  # a partial second block per row
    fused = kernel.uniform_noise(seeds, steps, vocab)
    expected = uniform_noise_torch(seeds, steps, vocab)
    assert fused.dtype == torch.float32 and fused.shape == (6, vocab)
    assert torch.equal(fused.view(torch.int32), expected.view(torch.int32))


def test_no_rows_give_an_empty_result(kernel: ModuleType) -> None:
    empty = torch.zeros(0, dtype=torch.int64)
    assert kernel.uniform_noise(empty, empty, 10).shape == (0, 10)
