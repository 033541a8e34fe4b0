"""The fp8 codec: float8 e4m3 codes with one float32 scale per token and KV head.

    scale = max|x| / 448 over the head's channels (448: the largest e4m3 value)
    code  = e4m3(x / scale),   x' = code * scale

e4m3 keeps 3 mantissa bits: |x - x'| <= |x| / 16 for normal codes, and at most
scale * 2^-10 in the subnormal range. Codes are stored as raw bytes (uint8), so tiers
and index copies see a plain byte tensor.
"""

from __future__ import annotations

import torch

from strata.kv.codec import BlockCodec, BlockShape, PartSpec

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)


class Fp8Codec(BlockCodec):
    name = "fp8"
    layout_name = "fp8-e4m3"

    def parts(self, shape: BlockShape, dtype: torch.dtype) -> list[PartSpec]:
        kv = (shape.block_size, shape.num_kv_heads, shape.head_dim)
        scales = (shape.block_size, shape.num_kv_heads)
        return [
            PartSpec(kv, torch.uint8),
            PartSpec(scales, torch.float32),
            PartSpec(kv, torch.uint8),
            PartSpec(scales, torch.float32),
        ]

    @staticmethod
    def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float()
        scale = x.abs().amax(dim=-1) / FP8_MAX
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = (x / scale.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
        return codes.view(torch.uint8), scale

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        kc, ks = self._quantize(k)
        vc, vs = self._quantize(v)
        return [kc, ks, vc, vs]

    def decode(
        self, parts: list[torch.Tensor], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kc, ks, vc, vs = parts
        k = kc.view(FP8).float() * ks.unsqueeze(-1)
        v = vc.view(FP8).float() * vs.unsqueeze(-1)
        return k.to(dtype), v.to(dtype)


FP8_CODEC = Fp8Codec()
