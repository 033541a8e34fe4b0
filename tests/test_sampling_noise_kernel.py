"""The Triton noise kernel (strata/ops/triton_sampling_noise.py) equals the sampler's torch
hash bit for bit, on CPU under Triton's interpreter (fixture as in tests/test_moe_grouped.py:
the kernel module is imported afresh with TRITON_INTERPRET set, then dropped)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from strata.engine.sampler import uniform_noise_torch

pytest.importorskip("triton")

KERNEL_MODULE = "strata.ops.triton_sampling_noise"


@pytest.fixture(scope="module")
def kernel() -> Iterator[ModuleType]:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        for module in (tl, tl.standard):
            for name, value in vars(module).items():
                if isinstance(value, JITFunction):
                    mp.setattr(module, name, InterpretedFunction(value.fn))
        sys.modules.pop(KERNEL_MODULE, None)
        try:
            yield importlib.import_module(KERNEL_MODULE)
        finally:
            sys.modules.pop(KERNEL_MODULE, None)


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
