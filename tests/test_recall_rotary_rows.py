"""A recall step's RoPE in one kernel (kv/recall/rotary_rows.py) equals the torch path
bit for bit, on CPU under Triton's interpreter (tests/triton_interpret.py)."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType, SimpleNamespace

import pytest
import torch

from strata.attention.layer_inputs import AttentionInputs, HeadLayout
from strata.kv.recall.rotary_rows import fused_rotated_qkv
from strata.models.rope import RotaryEmbedding
from tests.triton_interpret import interpreted

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def kernel() -> Iterator[ModuleType]:
    with interpreted("strata.ops.rope_kv") as module:
        yield module


# bfloat16 has no numpy type, so the interpreter cannot run it; on GPUs the same kernel
# writes the pool's K/V in every bfloat16 decode step (benchmarks/gpu_check.py).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_rope_equals_the_torch_path(kernel: ModuleType, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    heads = HeadLayout(num_heads=4, num_kv_heads=2, head_dim=32)
    rope = RotaryEmbedding(SimpleNamespace(rope_theta=10000.0), 32, 4096)
    tokens = 5
    qkv = torch.randn(tokens, (4 + 2 * 2) * 32, generator=gen).to(dtype)
    positions = torch.tensor([0, 7, 100, 4095, 3])
    inputs = AttentionInputs(positions, rope, None)  # type: ignore[arg-type]  # no pool read
    fused = fused_rotated_qkv(qkv, inputs, heads)
    for got, want in zip(fused, inputs.rotated_qkv(qkv, heads), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(got, want)
