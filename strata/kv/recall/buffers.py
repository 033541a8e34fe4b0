"""Buffers: where a recall sequence's GPU tensors live, asked for by name.

A sequence, its working set and its policy each ask for their tensors through a
Buffers: a fresh tensor of their own (OwnBuffers), or one row of a RecallPage's tensor
(page.py), so that the page's sequences decode together, one set of kernels per layer.

    layered  a [layers, *rest] tensor: in a page [layers, rows, *rest], a row's view is
             [:, row], so [layer] of the whole page is [rows, *rest], contiguous, as
             [layer] of one row is [*rest]
    flat     a [*rest] tensor: in a page [rows, *rest], a row's view is [row]

Code that indexes a layer and then works over the trailing dimensions ([..., n, d])
therefore serves one sequence and a whole page alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Buffers(ABC):
    @abstractmethod
    def tensor(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, layered: bool,
        fill: float = 0,
    ) -> torch.Tensor:  # fmt: skip
        """The tensor `name` of this shape (`layered`: shape[0] is the layer), filled with
        `fill` unless it is a view of what others already hold (PageRows.whole)."""


class OwnBuffers(Buffers):
    """Fresh tensors: one sequence alone (and the unit tests of the parts); with `rows`,
    fresh tensors shaped as a page of that many rows (tests and benchmarks of a page's
    work without a page)."""

    def __init__(self, device: torch.device | None, rows: int = 0) -> None:
        self.device = device  # None: torch's default, the CPU
        self.rows = rows

    def tensor(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, layered: bool,
        fill: float = 0,
    ) -> torch.Tensor:  # fmt: skip
        if self.rows:
            shape = (shape[0], self.rows, *shape[1:]) if layered else (self.rows, *shape)
        return torch.full(shape, fill, dtype=dtype, device=self.device)
