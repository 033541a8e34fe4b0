"""The page attention kernel (strata/ops/triton_page_attention.py), under Triton's
interpreter, against the torch path page_decode runs (page_decode.attend: the keys and
values concatenated and masked): GQA groups that are not a power of two, several tiles and
splits, rows whose tail holds one token or is full, rows with no attended slot, and
strided row and head layouts (a page's layer views)."""

from __future__ import annotations

import pytest
import torch

from strata.kv.recall.page_decode import attend
from tests.triton_interpret import interpreted

KERNEL = "strata.ops.triton_page_attention"


def torch_path(*parts: torch.Tensor, scale: float) -> torch.Tensor:
    return attend(*parts, scale, kernel=False)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("rows", "kvh", "group", "slots", "bs", "sink", "tail"),
    [(3, 2, 3, 5, 4, 4, 7), (1, 2, 4, 12, 16, 16, 40), (2, 1, 1, 3, 8, 8, 17)],
)
def test_the_kernel_attends_as_the_torch_path(
    rows: int, kvh: int, group: int, slots: int, bs: int, sink: int, tail: int
) -> None:
    torch.manual_seed(rows * 10 + slots)
    d, layers = 16, 2
    q = torch.randn(rows, kvh * group, d)
    # layer views of [layers, rows, ...] buffers: rows strided past one layer's keys
    sink_k, sink_v = torch.randn(2, layers, rows, kvh, sink, d).unbind(0)
    ws_k, ws_v = torch.randn(2, layers, rows, kvh, slots, bs, d).unbind(0)
    tail_k, tail_v = torch.randn(2, layers, rows, kvh, tail, d).unbind(0)
    attended = torch.rand(rows, kvh, slots) < 0.6
    attended[0, 0] = False  # a head of a row with no slot attended
    held = torch.randint(0, tail, (rows,))
    held[0], held[-1] = 0, tail - 1  # only the newest token; a full tail
    parts = (q, sink_k[1], sink_v[1], ws_k[1], ws_v[1], attended, tail_k[1], tail_v[1], held)
    want = torch_path(*parts, scale=0.25)
    with interpreted(KERNEL) as module:
        got = module.page_attention(*parts, 0.25, block_n=16)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_layouts_the_kernel_cannot_read_are_refused() -> None:
    rows, kvh, d = 2, 2, 16
    q = torch.randn(rows, 2 * kvh, d)
    sink = torch.randn(rows, kvh, 4, d)
    ws = torch.randn(rows, kvh, 3, 4, d)
    tail = torch.randn(rows, kvh, 5, d)
    attended = torch.ones(rows, kvh, 3, dtype=torch.bool)
    held = torch.zeros(rows, dtype=torch.long)
    with interpreted(KERNEL) as module:
        with pytest.raises(ValueError, match="tokens, D"):  # tokens strided
            module.page_attention(q, sink, sink, ws, ws, attended, tail[:, :, ::2], tail[:, :, ::2],
                                  held, 1.0)  # fmt: skip
        with pytest.raises(ValueError, match="slots contiguous"):
            wide = torch.randn(rows, kvh, 3, 4, 2 * d)[..., :d]
            module.page_attention(q, sink, sink, wide, wide, attended, tail, tail, held, 1.0)
        with pytest.raises(ValueError, match="one layout"):
            other = ws.transpose(0, 1).contiguous().transpose(0, 1)
            module.page_attention(q, sink, sink, ws, other, attended, tail, tail, held, 1.0)
        with pytest.raises(ValueError, match="whole GQA groups"):
            module.page_attention(q[:, :3], sink, sink, ws, ws, attended, tail, tail, held, 1.0)
        with pytest.raises(ValueError, match="one held a row"):
            module.page_attention(q, sink, sink, ws, ws, attended, tail, tail, held[:1], 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_kernel_on_the_8b_shape(dtype: torch.dtype) -> None:
    """A page of 6 rows, 8 KV heads of 128 dims, 128 slots of 16 tokens (a budget of 2048),
    one sink block and a 48-token tail, against the torch path in float32."""
    from strata.ops.triton_page_attention import page_attention

    torch.manual_seed(0)
    rows, kvh, group, d, slots, bs, sink, tail = 6, 8, 4, 128, 128, 16, 16, 48
    dev = torch.device("cuda")
    q = torch.randn(rows, kvh * group, d, device=dev, dtype=dtype)
    sink_k, sink_v = torch.randn(2, rows, kvh, sink, d, device=dev, dtype=dtype).unbind(0)
    ws_k, ws_v = torch.randn(2, rows, kvh, slots, bs, d, device=dev, dtype=dtype).unbind(0)
    tail_k, tail_v = torch.randn(2, rows, kvh, tail, d, device=dev, dtype=dtype).unbind(0)
    attended = torch.rand(rows, kvh, slots, device=dev) < 0.9
    held = torch.randint(0, tail, (rows,), device=dev)
    parts = (q, sink_k, sink_v, ws_k, ws_v, attended, tail_k, tail_v, held)
    got = page_attention(*parts, d**-0.5)
    want = torch_path(*(p.float() if p.is_floating_point() else p for p in parts), scale=d**-0.5)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
