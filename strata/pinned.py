"""Large page-locked host tensors at exactly their size.

torch's pinned allocator (`pin_memory=True`) rounds every allocation up to a power of two,
so a 48 GiB host store pins 64 GiB, and two of them do not fit a 125 GiB host. Here the
memory is ordinary host memory, page-aligned, that the CUDA driver then page-locks
(`cudaHostRegister`) at its own size; the GPU reads and writes it as any pinned memory
(non-blocking copies, and kernels through unified addressing).

Lifetime: every tensor view of the memory holds the numpy array that owns it, and the
array's finalizer unregisters the pages before the array frees them, so the memory stays
page-locked exactly as long as any view of it lives.
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import torch

PAGE = 4096
_REGISTER_FLAGS = 0x01 | 0x02  # cudaHostRegisterPortable | cudaHostRegisterMapped


class PinnedMemoryError(RuntimeError):
    """The driver would not page-lock the memory (too little host RAM, say)."""


def _unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


def pinned_zeros(shape: tuple[int, ...], dtype: torch.dtype, pin: bool = True) -> torch.Tensor:
    """A zeroed host tensor of `shape`, page-locked when `pin` (and CUDA is available),
    taking exactly its bytes rounded up to a page."""
    if not (pin and torch.cuda.is_available()):
        return torch.zeros(shape, dtype=dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    size = max(PAGE, -(-nbytes // PAGE) * PAGE)
    raw = np.zeros(size + PAGE, dtype=np.uint8)  # calloc: the pages are zero until touched
    start = -raw.ctypes.data % PAGE
    owner = raw[start : start + size]
    ptr = owner.ctypes.data
    err = torch.cuda.cudart().cudaHostRegister(ptr, size, _REGISTER_FLAGS)
    if int(err) != 0:
        raise PinnedMemoryError(
            f"could not page-lock {size / 2**30:.2f} GiB of host memory (CUDA error "
            f"{int(err)}); ask for less host memory"
        )
    weakref.finalize(raw, _unregister, ptr)  # runs before numpy frees `raw`
    flat = torch.from_numpy(owner)  # holds `owner`, which holds `raw`
    return flat[:nbytes].view(dtype).view(shape)
