"""Triton row copy that reads or writes pinned host memory directly (zero copy over PCIe).

    dst[dst_rows[i]] = src[src_rows[i]]   for every i with src_rows[i] >= 0

src and dst are 2-D [rows, row_elems] tensors, contiguous; either may live in pinned host
memory, which a CUDA kernel addresses through unified virtual addressing (a pinned
buffer's host pointer is also its device pointer). The row indices are device tensors,
so the rows to move may be chosen on the device without a host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 1024


class _Pinned:
    """A pinned host tensor as a Triton pointer argument (its data pointer and dtype)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.dtype = tensor.dtype

    def data_ptr(self) -> int:
        return self.tensor.data_ptr()


@triton.jit
def _copy_rows_kernel(src_ptr, dst_ptr, src_rows_ptr, dst_rows_ptr, ROW: tl.constexpr,
                      CHUNK: tl.constexpr):  # fmt: skip
    i = tl.program_id(0)
    part = tl.program_id(1)
    src_row = tl.load(src_rows_ptr + i)
    if src_row >= 0:
        dst_row = tl.load(dst_rows_ptr + i)
        cols = part * CHUNK + tl.arange(0, CHUNK)
        mask = cols < ROW
        x = tl.load(src_ptr + src_row * ROW + cols, mask=mask)
        tl.store(dst_ptr + dst_row * ROW + cols, x, mask=mask)


def copy_rows(
    src: torch.Tensor, dst: torch.Tensor, src_rows: torch.Tensor, dst_rows: torch.Tensor
) -> None:
    """See the module docstring. src_rows, dst_rows: int64 CUDA tensors of equal length."""
    if src.dtype != dst.dtype or src.shape[1] != dst.shape[1]:
        raise ValueError("copy_rows needs rows of the same dtype and width")
    if not (src.is_contiguous() and dst.is_contiguous()):
        raise ValueError("copy_rows needs contiguous source and destination")
    n, row = src_rows.numel(), src.shape[1]
    if n == 0:
        return
    grid = (n, triton.cdiv(row, CHUNK))
    # Host tensors reach a CUDA kernel as raw pointers (under the interpreter, as they are).
    s = _Pinned(src) if src_rows.is_cuda and not src.is_cuda else src
    d = _Pinned(dst) if src_rows.is_cuda and not dst.is_cuda else dst
    _copy_rows_kernel[grid](s, d, src_rows, dst_rows, ROW=row, CHUNK=CHUNK)
