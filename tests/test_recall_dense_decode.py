"""A recall sequence's dense-layer decode on CUDA (kv/recall/dense_decode.py): the split-K
Triton kernel over the dense buffers seen as pages, against attention computed directly,
on CPU under Triton's interpreter (tests/triton_interpret.py)."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from strata.kv.recall.dense_decode import DENSE_TILE, DenseDecode, paged_view
from strata.kv.recall.geometry import RecallGeometry
from tests.triton_interpret import interpreted

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def kernel() -> Iterator[ModuleType]:
    with interpreted("strata.attention.triton_decode") as module:
        yield module


def direct(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int,
           scale: float) -> torch.Tensor:  # fmt: skip
    """q [1, H, D] over the first `length` of keys, values [KVH, capacity, D]."""
    kvh = keys.shape[0]
    grouped = q[0].view(kvh, -1, q.shape[-1])  # [KVH, G, D]
    scores = grouped @ keys[:, :length].transpose(1, 2) * scale
    return (scores.softmax(-1) @ values[:, :length]).reshape(1, -1, q.shape[-1])


@pytest.mark.parametrize("length", [1, 37, 64, 65, 128])
def test_dense_decode_equals_direct_attention(kernel: ModuleType, length: int) -> None:
    gen = torch.Generator().manual_seed(length)
    kvh, group, d, capacity = 2, 2, 32, 2 * DENSE_TILE
    keys = torch.randn(kvh, capacity, d, generator=gen)
    values = torch.randn(kvh, capacity, d, generator=gen)
    keys[:, length:] = float("nan")  # past the length: never read
    values[:, length:] = float("nan")
    q = torch.randn(1, kvh * group, d, generator=gen)
    at = torch.tensor([length])
    out = DenseDecode(capacity, torch.device("cpu")).attend(q, keys, values, at, d**-0.5)
    torch.testing.assert_close(out, direct(q, keys, values, length, d**-0.5))


def test_paged_view_is_the_buffer() -> None:
    kvh, d, capacity = 2, 4, 2 * DENSE_TILE
    buffer = torch.arange(kvh * capacity * d, dtype=torch.float32).view(kvh, capacity, d)
    view = paged_view(buffer)
    assert view.shape == (2, DENSE_TILE, kvh, d)
    assert view.data_ptr() == buffer.data_ptr()
    page, offset, head = 1, 5, 1
    assert torch.equal(view[page, offset, head], buffer[head, page * DENSE_TILE + offset])


def test_dense_buffers_round_up_to_whole_pages() -> None:
    assert RecallGeometry.dense_tokens(1) == DENSE_TILE
    assert RecallGeometry.dense_tokens(DENSE_TILE) == DENSE_TILE
    assert RecallGeometry.dense_tokens(DENSE_TILE + 1) == 2 * DENSE_TILE
    with pytest.raises(ValueError, match="multiple"):
        DenseDecode(DENSE_TILE + 1, torch.device("cpu"))
