"""Triton row copy that reads or writes pinned host memory directly (zero copy over PCIe).

    dst[dst_rows[i]] = src[src_rows[i]]   for every i with src_rows[i] >= 0

src and dst are 2-D [rows, row_elems] tensors, contiguous; either may live in pinned host
memory, which a CUDA kernel addresses through unified virtual addressing (a pinned
buffer's host pointer is also its device pointer). The row indices are device tensors,
so the rows to move may be chosen on the device without a host sync.

`fetch_blocks` does the same for a recall working set's moves, working out each row's
source and destination in the kernel (one launch instead of about ten index kernels
and the copy):

    for each (r, h, i) with mask[r, h, i]:
        dst[(r * kv_heads + h) * ws_slots + slots[r, h, i]]
            = src[(layer_base + table[r, blocks[r, h, i]]) * kv_heads + h]
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


@triton.jit
def _fetch_blocks_kernel(src_ptr, dst_ptr, table_ptr, blocks_ptr, slots_ptr, mask_ptr,
                         table_row, layer_base, KVH, PICKS, WS_SLOTS, ROW: tl.constexpr,
                         CHUNK: tl.constexpr):  # fmt: skip
    lane = tl.program_id(0)  # (r * KVH + h) * PICKS + i
    part = tl.program_id(1)
    if tl.load(mask_ptr + lane) != 0:
        r = lane // (KVH * PICKS)
        h = lane // PICKS % KVH
        host_slot = tl.load(table_ptr + r * table_row + tl.load(blocks_ptr + lane))
        src_row = (layer_base + host_slot.to(tl.int64)) * KVH + h  # the store passes 2^31
        dst_row = (r * KVH + h) * WS_SLOTS + tl.load(slots_ptr + lane)
        cols = part * CHUNK + tl.arange(0, CHUNK)
        mask = cols < ROW
        x = tl.load(src_ptr + src_row * ROW + cols, mask=mask)
        tl.store(dst_ptr + dst_row * ROW + cols, x, mask=mask)


def fetch_blocks(
    src: torch.Tensor, dst: torch.Tensor, table: torch.Tensor, layer_base: int,
    blocks: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor, ws_slots: int,
) -> None:  # fmt: skip
    """See the module docstring. src [rows, row_elems] (the host store, flat), dst
    [rows, row_elems] (a layer's working-set rows), table [R, room] (each block's host
    slot), blocks, slots, mask [R, kv_heads, picks] on the compute device."""
    if src.dtype != dst.dtype or src.shape[1] != dst.shape[1]:
        raise ValueError("fetch_blocks needs rows of the same dtype and width")
    if not (src.is_contiguous() and dst.is_contiguous()):
        raise ValueError("fetch_blocks needs contiguous source and destination")
    _, kvh, picks = blocks.shape
    row = src.shape[1]
    if blocks.numel() == 0:
        return
    table, blocks, slots = table.contiguous(), blocks.contiguous(), slots.contiguous()
    moved = mask.contiguous().view(torch.uint8)
    s = _Pinned(src) if blocks.is_cuda and not src.is_cuda else src
    _fetch_blocks_kernel[(blocks.numel(), triton.cdiv(row, CHUNK))](
        s, dst, table, blocks, slots, moved, table.shape[-1], layer_base, kvh, picks, ws_slots,
        ROW=row, CHUNK=CHUNK,
    )  # fmt: skip
