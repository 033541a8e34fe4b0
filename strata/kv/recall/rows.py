"""Moving block rows between the host store and the GPU without a host sync.

A row is one block of one head in one layer (block_size x head_dim). On CUDA a Triton
kernel reads or writes pinned host rows in place (strata/ops/triton_row_copy.py), so the
rows a policy picked on the device move without the host learning which they are. On
CPU, plain indexing does the same.
"""

from __future__ import annotations

import torch


def copy_rows(
    src: torch.Tensor, dst: torch.Tensor, src_rows: torch.Tensor, dst_rows: torch.Tensor
) -> None:
    """dst[dst_rows[i]] = src[src_rows[i]] for every i with src_rows[i] >= 0; src and dst
    are [rows, row_elems] (dst contiguous); the row indices live on the compute device."""
    if src_rows.is_cuda:
        src = src.contiguous()
        from strata.ops.triton_row_copy import copy_rows as triton_copy_rows

        triton_copy_rows(src, dst, src_rows, dst_rows)
        return
    wanted = src_rows >= 0
    dst[dst_rows[wanted]] = src[src_rows[wanted]]
