"""DenseLayers: a recall sequence's first layers, which keep every token on the GPU.

    k, v   [dense_layers, kv_heads, capacity, head_dim]; capacity = max_tokens rounded up
           to whole DENSE_TILE pages (RecallGeometry.dense_tokens)

A prefill chunk is written at its host span and attended causally. A decode token is
written and attended at its position on the device, whatever the host knows, so a whole
step's CUDA graph (step_graphs.py) replays it: by the split-K kernel on CUDA
(dense_decode.py), else by masked attention over the capacity.
"""

from __future__ import annotations

import torch

from strata.kv.recall.chunk_attention import chunk_attention, masked_decode_attention
from strata.kv.recall.dense_decode import DenseDecode
from strata.kv.recall.geometry import RecallGeometry


class DenseLayers:
    def __init__(
        self, geometry: RecallGeometry, max_tokens: int, device: torch.device, kernel: bool
    ) -> None:
        """kernel: decode by the split-K kernel where the device is CUDA."""
        g = geometry
        shape = (g.dense_layers, g.num_kv_heads, g.dense_tokens(max_tokens), g.head_dim)
        self.k = torch.zeros(shape, dtype=g.dtype, device=device)
        self.v = torch.zeros_like(self.k)
        on_cuda = device.type == "cuda" and kernel
        self.kernel = DenseDecode(shape[2], device) if on_cuda else None
        self._index = torch.arange(shape[2], device=device)  # decode without the kernel

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int, positions: torch.Tensor
    ) -> None:
        """The K/V [T, KVH, D] of tokens [start, start + T) (one token: at positions [1])."""
        if k.shape[0] == 1:
            self.k[layer].index_copy_(1, positions, k.transpose(0, 1))
            self.v[layer].index_copy_(1, positions, v.transpose(0, 1))
        else:
            self.k[layer][:, start : start + k.shape[0]] = k.transpose(0, 1)
            self.v[layer][:, start : start + k.shape[0]] = v.transpose(0, 1)

    def attend(
        self, layer: int, q: torch.Tensor, start: int, scale: float, positions: torch.Tensor
    ) -> torch.Tensor:
        """Queries q [T, H, D] of tokens [start, start + T) over the layer's tokens up to
        each (one token: up to positions [1], on the device)."""
        keys, values = self.k[layer], self.v[layer]
        end = start + q.shape[0]
        if q.shape[0] > 1:
            return chunk_attention(q, keys[:, :end], values[:, :end], None, 0, start, scale)
        if self.kernel is not None:
            return self.kernel.attend(q, keys, values, positions + 1, scale)
        visible = self._index <= positions  # [capacity]: tokens 0..position
        mask = visible[None, None].expand(1, keys.shape[0], -1)
        return masked_decode_attention(q, keys[None], values[None], mask, scale)
