"""CPU checks of the GPU speed settings: backend choice, config validation, graph sizes,
pinned staging's CPU path and the fused ops' torch fallbacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from strata.attention.backend import choose_backend
from strata.config import EngineConfig
from strata.engine.cuda_graphs import capture_sizes
from strata.engine.staging import PinnedStager
from strata.ops.activation import silu_and_mul
from strata.ops.rmsnorm import add_rmsnorm


def test_auto_backend_is_reference_on_cpu() -> None:
    name, why = choose_backend("auto", torch.device("cpu"))
    assert name == "reference" and "cpu" in why
    assert choose_backend("triton", torch.device("cpu"))[0] == "triton"


def test_config_rejects_unknown_backend() -> None:
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(attention_backend="flash")
    with pytest.raises(ValueError, match="cuda_graph_max_batch"):
        EngineConfig(cuda_graph_max_batch=0)


def test_capture_sizes() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = capture_sizes(256)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256 and len(sizes) == 35


def test_stager_cpu_round_trip() -> None:
    stager = PinnedStager(torch.device("cpu"), torch.long)
    a, b = stager.upload([np.arange(3), np.array([[4, 5], [6, 7]])])
    assert a.tolist() == [0, 1, 2] and b.tolist() == [[4, 5], [6, 7]]
    assert a.dtype == torch.long


def test_fused_ops_fall_back_to_torch_on_cpu() -> None:
    x, r = torch.randn(3, 8), torch.randn(3, 8)
    w = torch.rand(8)
    out, s = add_rmsnorm(x, r, w, 1e-5, fused=True)
    ref = (x + r) * torch.rsqrt((x + r).pow(2).mean(-1, keepdim=True) + 1e-5) * w
    assert torch.allclose(out, ref, atol=1e-6) and torch.equal(s, x + r)
    gu = torch.randn(3, 16)
    expected = torch.nn.functional.silu(gu[:, :8]) * gu[:, 8:]
    assert torch.equal(silu_and_mul(gu, fused=True), expected)
