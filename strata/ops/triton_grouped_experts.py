"""Triton grouped expert MLP ("fused MoE"): every expert of a layer in two launches.

Rows are sorted by expert (routed.group_by_expert); the host, which already read the
per-expert counts, cuts each expert's rows into tiles of BLOCK_M rows:

    tiles [T, 4] int64:  row_start | row_end | gate_up offset | down offset
                         (row_end - row_start <= BLOCK_M; offsets in elements from the
                          gate_up / down base pointers, may be negative)

    launch 1, grid (T, cdiv(F, BN)):  h[r, n] = silu(x[r] . gate[n]) * (x[r] . up[n])
    launch 2, grid (T, cdiv(H, BN)):  out[r, n] = h[r] . down[n]

Weights are row-major as in the slots: gate_up [2F, H] (gate rows first), down [H, F].
Accumulation is float32; gate and up are rounded to the activation dtype before silu,
silu is rounded, then the product, as torch's F.linear + silu_and_mul does. The tiling
is fixed (not picked per call), so a row's result does not depend on how many rows its
expert has or which slot holds it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 16
TILE_FIELDS = 4


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, h_ptr, tiles_ptr, H, F,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    row_start = tl.load(tiles_ptr + tile * 4)
    row_end = tl.load(tiles_ptr + tile * 4 + 1)
    w_off = tl.load(tiles_ptr + tile * 4 + 2)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < F
    ks = tl.arange(0, BLOCK_K)
    gate_ptrs = w_ptr + w_off + cols[None, :].to(tl.int64) * H + ks[:, None]
    up_ptrs = gate_ptrs + F * H
    x_ptrs = x_ptr + rows[:, None] * H + ks[None, :]
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_mask = (k0 + ks) < H
        x = tl.load(x_ptrs + k0, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        wg = tl.load(gate_ptrs + k0, mask=w_mask, other=0.0)
        wu = tl.load(up_ptrs + k0, mask=w_mask, other=0.0)
        acc_gate = tl.dot(x, wg, acc_gate)
        acc_up = tl.dot(x, wu, acc_up)
    dtype = h_ptr.dtype.element_ty
    g = acc_gate.to(dtype).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype)
    h = (act * acc_up.to(dtype)).to(dtype)
    out_mask = row_mask[:, None] & col_mask[None, :]
    tl.store(h_ptr + rows[:, None] * F + cols[None, :], h, mask=out_mask)


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, out_ptr, tiles_ptr, H, F,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    row_start = tl.load(tiles_ptr + tile * 4)
    row_end = tl.load(tiles_ptr + tile * 4 + 1)
    w_off = tl.load(tiles_ptr + tile * 4 + 3)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < H
    ks = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + w_off + cols[None, :].to(tl.int64) * F + ks[:, None]
    h_ptrs = h_ptr + rows[:, None] * F + ks[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        k_mask = (k0 + ks) < F
        h = tl.load(h_ptrs + k0, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(h, w, acc)
    dtype = out_ptr.dtype.element_ty
    out_mask = row_mask[:, None] & col_mask[None, :]
    tl.store(out_ptr + rows[:, None] * H + cols[None, :], acc.to(dtype), mask=out_mask)


def expert_tiles(groups: list[tuple[int, int, int, int]], device: torch.device) -> torch.Tensor:
    """groups: (row_start, rows, gate_up offset, down offset) per expert -> tiles [T, 4]
    on `device`, copied without a host sync."""
    tiles: list[int] = []
    for start, count, gu_off, dn_off in groups:
        for row in range(start, start + count, BLOCK_M):
            tiles += (row, min(row + BLOCK_M, start + count), gu_off, dn_off)
    host = torch.tensor(tiles, dtype=torch.int64).view(-1, TILE_FIELDS)
    return host.to(device, non_blocking=True)


def grouped_mlp(
    rows_in: torch.Tensor,
    rows_out: torch.Tensor,
    gate_up_base: torch.Tensor,
    down_base: torch.Tensor,
    tiles: torch.Tensor,
    intermediate_size: int,
) -> None:
    """rows_out[r] = down(silu(gate(x)) * up(x)) for every row r of every tile; rows
    outside the tiles are left untouched. rows_in/rows_out: [N, H], contiguous."""
    num_tiles = tiles.shape[0]
    if num_tiles == 0:
        return
    hidden = rows_in.shape[1]
    h = torch.empty(
        (rows_in.shape[0], intermediate_size), dtype=rows_out.dtype, device=rows_in.device
    )
    bn_up, bk_up, bn_down, bk_down = 32, 128, 64, 64
    _gate_up_kernel[(num_tiles, triton.cdiv(intermediate_size, bn_up))](
        rows_in, gate_up_base, h, tiles, hidden, intermediate_size,
        BLOCK_M=BLOCK_M, BLOCK_N=bn_up, BLOCK_K=bk_up, num_warps=4, num_stages=3,
    )  # fmt: skip
    _down_kernel[(num_tiles, triton.cdiv(hidden, bn_down))](
        h, down_base, rows_out, tiles, hidden, intermediate_size,
        BLOCK_M=BLOCK_M, BLOCK_N=bn_down, BLOCK_K=bk_down, num_warps=4, num_stages=3,
    )  # fmt: skip
