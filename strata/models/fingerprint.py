"""Model fingerprints: a stable digest of a model's weights, for block keys.

SHA-256 over every parameter's name, shape, dtype and an evenly strided sample of its
values. The sample keeps this to milliseconds for multi-GB models while still telling
apart any two checkpoints that differ in more than a handful of values; it depends on
the weights alone, not on paths or names of files.
"""

from __future__ import annotations

import hashlib

import torch

SAMPLES_PER_TENSOR = 4096


def weights_fingerprint(named_tensors: list[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256(b"strata-fingerprint/1")
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
        sample = flat[::step][:SAMPLES_PER_TENSOR].float().cpu().contiguous()
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()
