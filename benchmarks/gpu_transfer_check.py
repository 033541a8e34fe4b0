"""The cpu tier's block transfer on CUDA (strata/kv/tiers/transfer.py), checked and timed.

Pool blocks of the Llama-3-8B shape (2 MiB each, bf16) are stored into pinned slots in a
shuffled order and loaded back into other shuffled blocks, through the double-buffered
load; every loaded byte must equal the stored block. The load's rate is set beside one
pinned host-to-device copy of the same bytes, measured in the same run.

    python benchmarks/gpu_transfer_check.py [--blocks 512] [--codec none]
"""

from __future__ import annotations

import argparse
import random
import time
from types import SimpleNamespace

import torch

from strata.kv.cache import KVCache
from strata.kv.codec import get_codec
from strata.kv.tiers.slot_codec import SlotCodec
from strata.kv.tiers.transfer import BlockTransfer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--blocks", type=int, default=512, help="blocks moved (default 512: 1 GiB)")
    p.add_argument("--codec", default="none", help="tier codec: none, fp8, int8, int4")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda", help="cuda (cpu: a smoke run of the check)")
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model = SimpleNamespace(num_layers=32, num_kv_heads=8, head_dim=128)
    n = args.blocks
    kv = KVCache(model, 2 * n + 8, 16, torch.bfloat16, device)  # type: ignore[arg-type]
    for part in kv.parts:
        part.copy_(torch.randn(part.shape, device=device).to(part.dtype))
    codec = None if args.codec == "none" else get_codec(args.codec)
    slot_bytes = kv.num_layers * SlotCodec(kv, codec).row_bytes
    slab = torch.empty((n, slot_bytes), dtype=torch.uint8, pin_memory=cuda)
    transfer = BlockTransfer(kv, slab, codec)
    rng = random.Random(0)
    sources = list(range(n))
    slots = rng.sample(range(n), n)
    transfer.store(sources, slots, None)
    reference = [part[:, sources].clone() for part in kv.parts]
    targets = rng.sample(range(n, 2 * n + 8), n)
    times = []
    for _ in range(args.repeats):
        for part in kv.parts:
            part[:, targets] = 0
        sync(device)
        start = time.perf_counter()
        transfer.load(slots, targets)
        times.append(time.perf_counter() - start)
    loaded = [part[:, targets] for part in kv.parts]
    # raw: byte for byte; a lossy codec: its round trip's error, bounded loosely
    pairs = zip(loaded, reference, strict=True)
    error = max((a.float() - b.float()).abs().max().item() for a, b in pairs)
    same = error == 0 if codec is None else error < 1.0
    nbytes = n * slot_bytes
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    h2d = []
    for _ in range(args.repeats):
        sync(device)
        start = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        sync(device)
        h2d.append(time.perf_counter() - start)
    load_rate, pin_rate = nbytes / min(times) / 1e9, nbytes / min(h2d) / 1e9
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(
        f"{name}: {n} blocks of {slot_bytes / 2**20:.2f} MiB "
        f"(codec {args.codec}), stage chunk {transfer.chunk} blocks, max error {error:g}"
    )
    print(f"| check | load GB/s (best of {args.repeats}) | pinned H2D GB/s | % of pinned |")
    print("|---|---|---|---|")
    print(
        f"| {'PASS' if same else 'FAIL'} | {load_rate:.1f} | {pin_rate:.1f} | "
        f"{load_rate / pin_rate:.0%} |"
    )


if __name__ == "__main__":
    main()
