"""Pool blocks <-> tier slot rows: the bytes a block has in the cpu tier and below.

    pool   : kv_cache.parts, each [layers, num_blocks, *part shape]    (raw pool: k, v)
    row    : [layers, part 0 bytes | part 1 bytes | ...] of the slot codec's parts
    rows   : uint8 [n, layers, row bytes], n blocks of one batch

The slot codec is the pool's own codec (kv_cache_dtype), whose parts are copied as they
are, unless a tier codec is set (kv_tier_codec, raw pool only). Then `gather` encodes
the pool's K and V where they live, on the GPU before the device->host copy (on CPU
tensors on a CPU pool), and `scatter` decodes rows into the pool after the host->device
copy: PCIe, disk and network carry the coded bytes.

Invariant: a row holds the codec named by the tier BlockLayout's codec field (so it is
in every stored block's header and its store namespace), and a row read back from disk
or a remote store is decoded only after `stored_block_problem` found every scale and
zero finite (lower.py checks it before the row reaches a cpu slot).
"""

from __future__ import annotations

import torch

from strata.kv.cache import KVCache
from strata.kv.codec import BlockCodec, BlockShape, PartSpec, codec_for_layout, get_codec
from strata.kv.tiers.base import BlockLayout

# Peak temporaries of a coded gather or scatter are a few times the float32 K and V of
# its blocks; a batch keeps those under this many bytes (transfer.py cuts batches).
RECODE_BYTES = 256 << 20


def tier_codec(name: str) -> BlockCodec | None:
    """The codec of a kv_tier_codec choice; None for "none" (the pool's bytes)."""
    return None if name == "none" else get_codec(name)


def _columns(specs: list[PartSpec]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    offset = 0
    for spec in specs:
        out.append((offset, offset + spec.nbytes))
        offset += spec.nbytes
    return out


class SlotCodec:
    def __init__(self, kv: KVCache, codec: BlockCodec | None = None) -> None:
        self.kv = kv
        self.codec = codec or kv.codec
        self.recode = self.codec.layout_name != kv.codec.layout_name
        if self.recode and not kv.codec.lossless:
            raise ValueError(
                f"a tier codec ({self.codec.name}) needs a raw KV pool, not {kv.codec.name}"
            )
        self.specs = self.codec.parts(kv.shape, kv.dtype)
        self.columns = _columns(self.specs)
        self.row_bytes = self.columns[-1][1]
        layers = kv.num_layers
        # Each pool part as bytes [layers, num_blocks, part bytes] (copied as is).
        self.part_bytes = [p.view(layers, p.shape[1], -1).view(torch.uint8) for p in kv.parts]

    @property
    def recode_bytes(self) -> int:
        """The float32 K and V of one block, all layers: what a coded batch's temporaries
        scale with."""
        s = self.kv.shape
        return self.kv.num_layers * 2 * s.block_size * s.num_kv_heads * s.head_dim * 4

    def gather(self, index: torch.Tensor, rows: torch.Tensor) -> None:
        """rows [n, layers, row bytes] <- the pool blocks `index` (long, on the pool's device)."""
        if self.recode:
            parts = self._encode(index)
        else:
            parts = [p.index_select(1, index) for p in self.part_bytes]
        for part, (a, b) in zip(parts, self.columns, strict=True):
            rows[:, :, a:b].copy_(part.transpose(0, 1))

    def _encode(self, index: torch.Tensor) -> list[torch.Tensor]:
        """The codec's parts of the blocks, each as bytes [layers, n, part bytes]."""
        layers, n = self.kv.num_layers, index.numel()
        k = self.kv.parts[0].index_select(1, index).flatten(0, 1)
        v = self.kv.parts[1].index_select(1, index).flatten(0, 1)
        coded = self.codec.encode(k, v)  # each [layers * n, *part shape]
        return [c.contiguous().view(layers, n, -1).view(torch.uint8) for c in coded]

    def scatter(self, rows: torch.Tensor, index: torch.Tensor) -> None:
        """The pool blocks `index` <- rows [n, layers, row bytes], decoded when recoding."""
        cols = [rows[:, :, a:b].transpose(0, 1) for a, b in self.columns]  # [layers, n, bytes]
        if not self.recode:
            for part, col in zip(self.part_bytes, cols, strict=True):
                part.index_copy_(1, index, col)
            return
        layers, n = self.kv.num_layers, index.numel()
        parts = [
            col.contiguous().view(spec.dtype).view(layers * n, *spec.shape)
            for col, spec in zip(cols, self.specs, strict=True)
        ]
        k, v = self.codec.decode(parts, self.kv.dtype)
        self.kv.parts[0].index_copy_(1, index, k.view(layers, n, *k.shape[1:]))
        self.kv.parts[1].index_copy_(1, index, v.view(layers, n, *v.shape[1:]))


def stored_block_problem(layout: BlockLayout, payload: torch.Tensor) -> str | None:
    """Why a stored block's coded payload must not be decoded, or None if it may be: every
    floating-point part of a lossy codec (its scales and zeros) must be finite. Raw blocks
    are KV itself and are not inspected (their checksum or MAC is the check)."""
    codec = codec_for_layout(layout.codec)
    if codec.lossless:
        return None
    shape = BlockShape(layout.block_size, layout.num_kv_heads, layout.head_dim)
    specs = codec.parts(shape, layout.torch_dtype)
    rows = payload.reshape(layout.num_layers, -1)
    for i, (spec, (a, b)) in enumerate(zip(specs, _columns(specs), strict=True)):
        if not spec.dtype.is_floating_point:
            continue
        values = rows[:, a:b].contiguous().view(spec.dtype)
        if not bool(torch.isfinite(values).all()):
            return f"{codec.name} block: part {i} (scales) holds a value that is not finite"
    return None
