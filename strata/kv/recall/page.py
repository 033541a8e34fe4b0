"""RecallPage: recall sequences whose GPU state shares tensors, so a decode step attends
for all of them with one set of kernels per layer.

    buffers   name -> tensor, [layers, capacity, ...] or [capacity, ...] (buffers.py)
    rows      row r: the sequence whose state is [:, r] / [r] of every buffer, or free

Sequences share a page when every buffer has the same shape for them: the same policy,
budget (working-set slots) and room (their host slots, rounded: geometry.room_blocks).
The page's decode (page_decode.py) runs over all `capacity` rows with an `active` mask: a
row that is free or not decoding this step computes, but nothing of its state changes,
so every shape is fixed by the page and each layer's kernels are captured in a CUDA
graph once and replayed whatever rows take part (LayerGraphs; the buffers never move).

Invariants: a row belongs to at most one sequence; a sequence's buffers are zeroed (or
given their fill) when it takes its row; the page's GPU bytes are reserved whole, while
it holds any row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from strata.kv.recall.buffers import Buffers
from strata.kv.recall.layer_graphs import LayerGraphs

if TYPE_CHECKING:
    from strata.kv.recall.page_decode import PageDecoder

PageKey = tuple[str, int, int]  # policy, budget blocks, room blocks (geometry.py)


@dataclass(frozen=True)
class PageRows(Buffers):
    """Buffers of one row (row >= 0), or the whole page's (row -1: every buffer must
    exist already)."""

    page: RecallPage
    row: int

    def tensor(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, layered: bool,
        fill: float = 0,
    ) -> torch.Tensor:  # fmt: skip
        whole = self.page.buffer(name, shape, dtype, layered, create=self.row >= 0)
        if self.row < 0:
            return whole
        view = whole[:, self.row] if layered else whole[self.row]
        return view.fill_(fill)


class RecallPage:
    def __init__(
        self, key: PageKey, capacity: int, row_bytes: int, device: torch.device,
        graph_stream: torch.cuda.Stream | None,
    ) -> None:  # fmt: skip
        self.key, self.capacity, self.row_bytes, self.device = key, capacity, row_bytes, device
        self._buffers: dict[str, torch.Tensor] = {}
        self.owners: list[str | None] = [None] * capacity  # request id of each row
        self.graphs = LayerGraphs(graph_stream) if graph_stream is not None else None
        self.decoder: PageDecoder | None = None  # made once the first row has allocated

    @property
    def nbytes(self) -> int:
        """GPU bytes reserved while the page holds any row."""
        return self.capacity * self.row_bytes

    def free_row(self) -> int | None:
        return next((r for r, owner in enumerate(self.owners) if owner is None), None)

    def take(self, row: int, owner: str) -> Buffers:
        if self.owners[row] is not None:
            raise RuntimeError(f"recall page row {row} is held by {self.owners[row]!r}")
        self.owners[row] = owner
        return PageRows(self, row)

    def give_back(self, owner: str) -> None:
        self.owners[self.owners.index(owner)] = None

    @property
    def empty(self) -> bool:
        return all(owner is None for owner in self.owners)

    def whole(self) -> Buffers:
        return PageRows(self, -1)

    def buffer(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, layered: bool, create: bool
    ) -> torch.Tensor:
        full = (shape[0], self.capacity, *shape[1:]) if layered else (self.capacity, *shape)
        tensor = self._buffers.get(name)
        if tensor is None:
            if not create:
                raise KeyError(f"recall page has no buffer {name!r}")
            tensor = self._buffers[name] = torch.zeros(full, dtype=dtype, device=self.device)
        if tuple(tensor.shape) != full or tensor.dtype != dtype:
            raise ValueError(
                f"recall page buffer {name!r} is {tuple(tensor.shape)} {tensor.dtype}, "
                f"asked for {full} {dtype}"
            )
        return tensor

    def release(self) -> None:
        """The page is empty and goes away: drop its graphs (and their memory pool)."""
        if self.graphs is not None:
            self.graphs.clear()
        self.decoder = None
        self._buffers.clear()
