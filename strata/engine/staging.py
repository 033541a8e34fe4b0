"""Host-to-device upload of a step's small arrays through persistent pinned buffers.

    parts (numpy) --pack--> pinned host buffer h[i % 2] --one non-blocking copy--> device

Two host buffers alternate. Before h[b] is rewritten, the event recorded after its last
copy is waited on. That copy was issued two uploads earlier and has finished long
before in practice, so the wait costs nothing; it only guards steps that end without a
host sync (a prefill chunk that samples nothing), where the DMA might otherwise read a
half-rewritten buffer. On CPU the parts are simply converted.
"""

from __future__ import annotations

import numpy as np
import torch


class PinnedStager:
    def __init__(self, device: torch.device, dtype: torch.dtype, capacity: int = 1 << 16) -> None:
        self.device = device
        self.dtype = dtype
        self._cuda = device.type == "cuda"
        self._np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        self._host: list[torch.Tensor] = []
        self._events: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        if self._cuda:
            self._host = [self._alloc(capacity), self._alloc(capacity)]

    def _alloc(self, n: int) -> torch.Tensor:
        return torch.empty(n, dtype=self.dtype, pin_memory=True)

    def upload(self, parts: list[np.ndarray]) -> list[torch.Tensor]:
        """Device tensors with each part's shape and this stager's dtype, in order."""
        if not self._cuda:
            return [torch.from_numpy(np.ascontiguousarray(p, self._np_dtype)) for p in parts]
        total = sum(p.size for p in parts)
        b, self._turn = self._turn, 1 - self._turn
        event = self._events[b]
        if event is not None:
            event.synchronize()  # the copy from h[b] two uploads ago; done in practice
        if self._host[b].numel() < total:
            self._host[b] = self._alloc(max(total, 2 * self._host[b].numel()))
        flat = self._host[b].numpy()
        offset = 0
        for p in parts:
            flat[offset : offset + p.size] = p.ravel()
            offset += p.size
        dev = self._host[b][:total].to(self.device, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._events[b] = done
        views, offset = [], 0
        for p in parts:
            views.append(dev[offset : offset + p.size].view(p.shape))
            offset += p.size
        return views
