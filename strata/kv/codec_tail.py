"""Full-precision tail rows: the open (partial) block of each sequence under a lossy codec.

    sequence   | b12 full | b3 full | b40 partial |
    pool       |  coded   |  coded  |  (stale)    |
    tail rows                        | row 5: t8 t9 .. .. |   exact, model dtype

A block's tokens are written to its row until the block is complete; then the block is
encoded into the pool and the row is freed (codec_step.py). Only the one sequence that
owns a partial block ever reads it: prefix caching, tiers and session pins deal in
complete blocks only. Rows are therefore needed by at most one block per running
sequence, so `num_rows = max_num_seqs` suffices.

A sequence that finishes, aborts or is preempted leaves its row behind. Rows are
reclaimed lazily: when none is free, every row whose block is not in `live_blocks()` (the
open blocks of running sequences, supplied by the engine) is freed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class TailRowsExhaustedError(RuntimeError):
    """More open blocks than tail rows: a bug in the row accounting, never user error."""


class TailStore:
    def __init__(
        self,
        num_rows: int,
        num_layers: int,
        block_shape: tuple[int, int, int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_rows <= 0:
            raise ValueError(f"a lossy KV codec needs at least one tail row, got {num_rows}")
        shape = (num_layers, num_rows, *block_shape)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_rows = num_rows
        self.row_of: dict[int, int] = {}  # block id -> row
        self._free = list(range(num_rows - 1, -1, -1))  # pop() hands out row 0 first
        self.live_blocks: Callable[[], set[int]] = lambda: set()

    @property
    def num_used(self) -> int:
        return len(self.row_of)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def reserve(self, n: int) -> None:
        """Make n rows free, collecting dead ones if needed. Called before a step assigns
        rows, so a row assigned in the step is never collected by the same step."""
        if len(self._free) < n:
            self.collect()
        if len(self._free) < n:
            raise TailRowsExhaustedError(
                f"{n} KV tail rows needed but {len(self._free)} of {self.num_rows} are free; "
                f"open blocks {sorted(self.row_of)}"
            )

    def assign(self, block_id: int) -> int:
        """A row for a block starting to fill (after `reserve`); the block must hold none."""
        if block_id in self.row_of or not self._free:
            raise TailRowsExhaustedError(f"no tail row for block {block_id}; reserve first")
        row = self._free.pop()
        self.row_of[block_id] = row
        return row

    def release(self, block_id: int) -> None:
        row = self.row_of.pop(block_id, None)
        if row is not None:
            self._free.append(row)

    def collect(self) -> int:
        """Free the rows of blocks no running sequence has open; returns how many."""
        live = self.live_blocks()
        dead = [b for b in self.row_of if b not in live]
        for block_id in dead:
            self.release(block_id)
        return len(dead)

    def check(self) -> list[str]:
        """Problems with the row accounting (empty when consistent); collects first."""
        self.collect()
        problems = []
        rows = list(self.row_of.values())
        if len(set(rows)) != len(rows) or set(rows) & set(self._free):
            problems.append(f"a KV tail row is held twice: {self.row_of}, free {self._free}")
        if len(rows) + len(self._free) != self.num_rows:
            problems.append(
                f"KV tail rows: {len(rows)} held + {len(self._free)} free != {self.num_rows}"
            )
        return problems
