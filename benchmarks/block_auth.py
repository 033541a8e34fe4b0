"""What authenticating tier blocks costs: encode + decode of one stored block, checksummed
(xxh3-128, no secret) against authenticated (keyed BLAKE2b-128, --kv-store-secret-file)
and encrypted (AES-256-GCM, --kv-store-encrypt),
in GB/s of block bytes, on one thread and on several (hashlib releases the GIL on large
buffers, so tiers that read in parallel verify in parallel).

    python3 benchmarks/block_auth.py [--layers 16 --kv-heads 8 --head-dim 64 --block-size 16]

Prints a markdown table; the block shape defaults to Llama-3.2-1B's in bfloat16.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from strata.kv.tiers import block_format
from strata.kv.tiers.base import BlockLayout, StoredBlock
from strata.kv.tiers.store_secret import StoreSecret


def _rate(fn: Callable[[], object], nbytes: int, threads: int, seconds: float = 1.0) -> float:
    """GB/s of block bytes through fn, run by `threads` threads for about `seconds`."""
    fn()
    done = 0
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        while time.perf_counter() - start < seconds:
            list(pool.map(lambda _: fn(), range(threads * 4)))
            done += threads * 4
    return done * nbytes / (time.perf_counter() - start) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    args = p.parse_args()
    layout = BlockLayout("ab" * 32, args.layers, args.kv_heads, args.head_dim, args.block_size,
                         "bfloat16")  # fmt: skip
    payload = torch.randint(0, 256, (layout.nbytes,), dtype=torch.uint8)
    block = StoredBlock(b"k" * 32, tuple(range(args.block_size)), payload)
    size = block_format.encoded_size(layout)
    secret = StoreSecret.of(b"benchmark secret of enough bytes")
    sealed = StoreSecret.of(b"benchmark secret of enough bytes", encrypt=True)
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"block {size / 2**20:.2f} MiB ({args.layers} layers, {args.kv_heads} kv heads, "
          f"head dim {args.head_dim}, {args.block_size} tokens, bf16)\n")  # fmt: skip
    print("| block check | threads | encode GB/s | decode (verify) GB/s |")
    print("|---|---|---|---|")
    checks = (("xxh3-128 checksum", None), ("BLAKE2b-128 MAC", secret),
              ("AES-256-GCM (--kv-store-encrypt)", sealed))  # fmt: skip
    for name, key in checks:
        data = b"".join(block_format.encode(layout, block, key))
        for threads in (1, 2):
            enc = _rate(lambda k=key: block_format.encode(layout, block, k), size, threads)
            dec = _rate(lambda k=key, d=data: block_format.decode(layout, d, b"k" * 32, k),
                        size, threads)  # fmt: skip
            print(f"| {name} | {threads} | {enc:.2f} | {dec:.2f} |")


if __name__ == "__main__":
    main()
