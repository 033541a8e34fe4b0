"""Where the host waits for the device, as torch's sync debug mode reports it, counted by
the Python line that waited ("file.py:123")."""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def host_syncs() -> Iterator[Counter[str]]:
    """The counter yielded is filled when the block ends (CUDA only)."""
    where: Counter[str] = Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield where
        finally:
            torch.cuda.set_sync_debug_mode(0)
    where.update(f"{os.path.basename(w.filename)}:{w.lineno}" for w in caught)
