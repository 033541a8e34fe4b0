"""LayerPrefetch: a page's cross-layer prefetch (--kv-recall-prefetch).

While layer i runs, layer i+1's query projection applied to layer i's input predicts
layer i+1's picks (the residual stream changes little from one layer to the next), and
those blocks come into layer i+1's working set on a stream of their own:

    layer i starts   current: q^ = RoPE(Wq_{i+1} norm_{i+1}(x_i)) into q_ahead[p]
                     ahead:   scores, top-k -> guessed[p]; working-set update; fetch;
                              event ready[p]                       (p: the layer's parity)
    layer i+1        current: waits for ready[p] (join), then decodes as always: its own
                              exact picks, fetching only what the guess missed
                     after:   counts its picks the guess held (precision = recall at
                              equal counts)

Two layers are in flight at most (i+1's prefetch is issued before layer i decodes), so
the buffers go by parity and the joins wait on events, not on the whole stream: layer
i's join does not wait for layer i+1's prefetch. The prefetch touches only its own
layer's working set, its own counters (bytes_prefetched, scratch hits and misses) and
its parity's buffers; nothing the current stream writes before the join.

Outputs do not change: a layer attends exactly its own picks, wherever in the working
set they sit. Without CUDA the prefetch runs in line, before the layer before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from strata.kv.recall.fetch import fill, forked
from strata.kv.recall.tensors import SequenceTensors

if TYPE_CHECKING:
    from strata.kv.recall.page_decode import PageDecoder


class LayerPrefetch:
    def __init__(self, decoder: PageDecoder, device: torch.device) -> None:
        g, rows = decoder.geometry, decoder.q.shape[0]
        slots = decoder.room.slots
        self.decoder = decoder
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ready = [torch.cuda.Event() for _ in range(2)] if self.stream is not None else []
        self.q = torch.zeros((2, rows, g.num_heads, g.head_dim), dtype=g.dtype, device=device)
        picks = (2, rows, g.num_kv_heads, slots)
        self.guessed = torch.full(picks, -1, dtype=torch.long, device=device)
        self.picked = torch.full(picks[1:], -1, dtype=torch.long, device=device)
        self.active = torch.zeros((2, rows), dtype=torch.bool, device=device)
        self.scratch = (torch.zeros(rows, dtype=torch.long, device=device),
                        torch.zeros(rows, dtype=torch.long, device=device))  # fmt: skip
        self.pending: list[int | None] = [None, None]  # the layer each parity's guess is for

    def issue(self, s: int, q: torch.Tensor, rows: torch.Tensor, active: torch.Tensor) -> None:
        """Sparse layer s's predicted picks into its working set, behind what the current
        stream has queued: q [n, H, D] (rotated) of page rows `rows`; `active` [capacity]."""
        d, p = self.decoder, s % 2
        t, ws, g = d.t, d.ws, d.geometry
        self.q[p][rows] = q.to(g.dtype)
        self.active[p].copy_(active)
        on = self.active[p]
        with forked(self.stream):
            picks = d.pick(s, self.q[p])
            self.guessed[p].copy_(picks)
            _, moves = ws.update(s, picks, on, self.scratch)
            fill(ws, d.policy, d.store, t.key_slots, t.value_slots, s, moves, False,
                 t.bytes_prefetched)  # fmt: skip
            if self.stream is not None:
                self.ready[p].record(self.stream)
        self.pending[p] = s

    def join(self, s: int) -> bool:
        """Before sparse layer s decodes: the current stream waits for its prefetch.
        False if none was issued for it."""
        p = s % 2
        if self.pending[p] != s:
            return False
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_event(self.ready[p])
        return True

    def count(self, s: int, t: SequenceTensors) -> None:
        """After sparse layer s decoded (its picks in `picked`, top-k indices: none is -1):
        count, per active row, the picks its prefetch had guessed, and the picks."""
        p = s % 2
        self.pending[p] = None
        picked, guessed = self.picked, self.guessed[p]
        right = (picked[..., :, None] == guessed[..., None, :]).any(-1)
        on = self.active[p]
        t.prefetch[:, 0, s] += torch.where(on, right.sum(dim=(-1, -2)), 0)
        t.prefetch[:, 1, s] += on * picked[0].numel()

    def settle(self) -> None:
        """End of the forward: nothing of the prefetch stream is left unjoined (a guess no
        layer decoded is dropped; what it fetched stays in the working set)."""
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
        self.pending = [None, None]
