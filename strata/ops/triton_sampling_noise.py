"""The sampler's counter-based noise (engine/sampler.py `uniform_noise`) in one Triton kernel.

    out[r, t] = ((mix(row_r ^ (t * 0x85EBCA6B)) >> 9) + 0.5) / 2^23
    row_r     = mix(mix(seed[r]) ^ mix(step[r] + 0x9E3779B9))

Bit for bit the torch version, which runs about fifteen int64 passes over [rows, vocab];
this kernel writes the float32 result once. The hash runs in int64 with every product
masked to its low 32 bits, as the torch version does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _mix32(x):
    x = x & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
    x = ((x ^ (x >> 15)) * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _noise_kernel(seed_ptr, step_ptr, out_ptr, vocab, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    part = tl.program_id(1)
    seed = tl.load(seed_ptr + r).to(tl.int64)
    step = tl.load(step_ptr + r).to(tl.int64)
    row = _mix32(_mix32(seed) ^ _mix32(step + 0x9E3779B9))
    cols = part * BLOCK + tl.arange(0, BLOCK)
    bits = _mix32(row ^ ((cols.to(tl.int64) * 0x85EBCA6B) & 0xFFFFFFFF))
    noise = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
    tl.store(out_ptr + r.to(tl.int64) * vocab + cols, noise, mask=cols < vocab)


def uniform_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, vocab] float32 in (0, 1); seed, step: int64 [rows] on the kernel's device."""
    rows = seed.shape[0]
    out = torch.empty((rows, vocab), dtype=torch.float32, device=seed.device)
    if rows:
        _noise_kernel[(rows, triton.cdiv(vocab, BLOCK))](seed, step, out, vocab, BLOCK=BLOCK)
    return out
