"""KIVI-style integer codecs (int8, int4, int2): asymmetric min-max groups with scales.

    K [block_size, heads, D]: one (scale, zero) per channel of each head, over the block's
                              tokens (KIVI's per-channel keys: outlier channels get their
                              own range)            -> k_scale, k_zero [heads, D]
    V [block_size, heads, D]: one (scale, zero) per token and group of VALUE_GROUP channels
                              of a head              -> v_scale, v_zero [block_size, heads, D/G]

    q = clamp(round((x - zero) / scale), 0, 2^bits - 1),   x' = q * scale + zero

Codes are packed 8/bits to a byte along the channels. Scales and zeros are float16,
rounded outward (zero down, scale up) so every x of the group lies in
[zero, zero + (2^bits - 1) * scale]: the error bound |x - x'| <= scale / 2 then holds
exactly, up to float32 arithmetic.
"""

from __future__ import annotations

import torch

from strata.kv.codec import BlockCodec, BlockShape, PartSpec

VALUE_GROUP = 32
SCALE_DTYPE = torch.float16
_TINY_SCALE = float(torch.finfo(SCALE_DTYPE).tiny)


def _fp16_down(x: torch.Tensor) -> torch.Tensor:
    """The largest float16 <= x (x float32)."""
    h = x.to(SCALE_DTYPE)
    return torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, -torch.inf)), h)


def _fp16_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest float16 >= x (x float32)."""
    h = x.to(SCALE_DTYPE)
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, torch.inf)), h)


def value_group(head_dim: int) -> int:
    return VALUE_GROUP if head_dim % VALUE_GROUP == 0 else head_dim


class IntCodec(BlockCodec):
    def __init__(self, bits: int) -> None:
        if bits not in (2, 4, 8):
            raise ValueError(f"integer KV codecs have 2, 4 or 8 bits, got {bits}")
        self.bits = bits
        self.levels = (1 << bits) - 1
        self.per_byte = 8 // bits
        self.name = f"int{bits}"
        self.layout_name = f"kivi-int{bits}"

    def parts(self, shape: BlockShape, dtype: torch.dtype) -> list[PartSpec]:
        bs, heads, dim = shape.block_size, shape.num_kv_heads, shape.head_dim
        if dim % self.per_byte:
            raise ValueError(f"{self.name} KV needs head_dim divisible by {self.per_byte}")
        codes = (bs, heads, dim // self.per_byte)
        groups = dim // value_group(dim)
        return [
            PartSpec(codes, torch.uint8),  # k codes
            PartSpec((heads, dim), SCALE_DTYPE),  # k scale
            PartSpec((heads, dim), SCALE_DTYPE),  # k zero
            PartSpec(codes, torch.uint8),  # v codes
            PartSpec((bs, heads, groups), SCALE_DTYPE),  # v scale
            PartSpec((bs, heads, groups), SCALE_DTYPE),  # v zero
        ]

    # ---- one group layout, shared by K and V ---------------------------------------------

    def _quantize(
        self, x: torch.Tensor, dim: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes (uint8, unpacked), scale and zero of x float32 grouped over `dim`."""
        lo = x.amin(dim=dim, keepdim=True)
        hi = x.amax(dim=dim, keepdim=True)
        zero = _fp16_down(lo)
        scale = _fp16_up(((hi - zero.float()) / self.levels).clamp_min(_TINY_SCALE))
        q = torch.round((x - zero.float()) / scale.float()).clamp_(0, self.levels)
        return q.to(torch.uint8), scale, zero

    def _pack(self, q: torch.Tensor) -> torch.Tensor:
        if self.per_byte == 1:
            return q
        q = q.view(*q.shape[:-1], q.shape[-1] // self.per_byte, self.per_byte)
        packed = torch.zeros(q.shape[:-1], dtype=torch.uint8, device=q.device)
        for i in range(self.per_byte):
            packed |= q[..., i] << (self.bits * i)
        return packed

    def _unpack(self, packed: torch.Tensor) -> torch.Tensor:
        if self.per_byte == 1:
            return packed
        shifts = torch.arange(0, 8, self.bits, dtype=torch.uint8, device=packed.device)
        q = (packed.unsqueeze(-1) >> shifts) & self.levels
        return q.view(*packed.shape[:-1], packed.shape[-1] * self.per_byte)

    # ---- the codec -----------------------------------------------------------------------

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        n, bs, heads, dim = k.shape
        g = value_group(dim)
        kq, k_scale, k_zero = self._quantize(k.float(), dim=1)  # over the block's tokens
        vg = v.float().view(n, bs, heads, dim // g, g)
        vq, v_scale, v_zero = self._quantize(vg, dim=-1)  # over a group of channels
        return [
            self._pack(kq),
            k_scale.squeeze(1),
            k_zero.squeeze(1),
            self._pack(vq.view(n, bs, heads, dim)),
            v_scale.squeeze(-1),
            v_zero.squeeze(-1),
        ]

    def decode(
        self, parts: list[torch.Tensor], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k_codes, k_scale, k_zero, v_codes, v_scale, v_zero = parts
        kq = self._unpack(k_codes).float()  # [n, bs, heads, D]
        k = kq * k_scale.float().unsqueeze(1) + k_zero.float().unsqueeze(1)
        vq = self._unpack(v_codes).float()
        n, bs, heads, dim = vq.shape
        groups = v_scale.shape[-1]
        vq = vq.view(n, bs, heads, groups, dim // groups)
        v = vq * v_scale.float().unsqueeze(-1) + v_zero.float().unsqueeze(-1)
        return k.to(dtype), v.view(n, bs, heads, dim).to(dtype)


INT8_CODEC, INT4_CODEC, INT2_CODEC = IntCodec(8), IntCodec(4), IntCodec(2)
