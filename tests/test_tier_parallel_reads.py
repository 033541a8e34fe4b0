"""Parallel reads of the disk tier straight into cpu tier slots: byte-identical blocks,
and a flipped byte among many is still caught; LowerTiers reads into reserved slots."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from pathlib import Path

import pytest
import torch

from strata.kv.prefix import BlockRef
from strata.kv.tiers.base import BlockLayout, StoredBlock
from strata.kv.tiers.cpu import CPUTier
from strata.kv.tiers.disk import DiskTier
from strata.kv.tiers.lower import LowerTiers
from strata.kv.tiers.store_secret import StoreSecret

# 16 KiB payloads: big enough that preadv splits header and payload for real
LAYOUT = BlockLayout("ab" * 32, num_layers=4, num_kv_heads=4, head_dim=32, block_size=8,
                     dtype="float16")  # fmt: skip
N = 40


def key(i: int) -> bytes:
    return hashlib.sha256(f"block {i}".encode()).digest()


def block(i: int) -> StoredBlock:
    g = torch.Generator().manual_seed(i)
    payload = torch.randint(0, 256, (LAYOUT.nbytes,), dtype=torch.uint8, generator=g)
    return StoredBlock(key(i), tuple(range(i, i + LAYOUT.block_size)), payload)


def test_parallel_reads_into_slots_are_byte_identical(tmp_path: Path) -> None:
    for secret in (None, StoreSecret.of(b"s" * 16), StoreSecret.of(b"s" * 16, encrypt=True)):
        tier = DiskTier(LAYOUT, tmp_path, 1 << 30, secret=secret, read_threads=4)
        tier.put([block(i) for i in range(N)])
        slab = torch.zeros((N + 1, LAYOUT.nbytes), dtype=torch.uint8)
        keys = [key(i) for i in range(N)] + [key(999)]  # the last one is a miss
        got = tier.get_into(keys, list(slab))
        assert got[-1] is None
        for i, b in enumerate(got[:-1]):
            assert b is not None and b.key == key(i) and b.token_ids == block(i).token_ids
            assert b.payload.data_ptr() == slab[i].data_ptr()  # read in place
            assert torch.equal(slab[i], block(i).payload)
        s = tier.stats.snapshot()
        assert (s["hits"], s["misses"], s["corrupt"]) == (N, 1, 0)
        assert s["bytes_read"] == N * tier.file_bytes and s["read_bytes_per_s"] > 0
        plain = tier.get(keys[:N])  # get() reads in parallel too, into its own buffers
        assert all(b is not None and torch.equal(b.payload, block(i).payload)
                   for i, b in enumerate(plain))  # fmt: skip
        tier.close()


def test_a_flipped_byte_among_parallel_reads_is_caught(tmp_path: Path) -> None:
    tier = DiskTier(LAYOUT, tmp_path, 1 << 30, read_threads=4)
    tier.put([block(i) for i in range(N)])
    for i, offset in ((7, -1), (23, tier.file_bytes // 2), (31, 160)):  # payload twice, a token id
        path = tier.path_of(key(i))
        data = bytearray(path.read_bytes())
        data[offset] ^= 0x01
        path.write_bytes(bytes(data))
    slab = torch.zeros((N, LAYOUT.nbytes), dtype=torch.uint8)
    got = tier.get_into([key(i) for i in range(N)], list(slab))
    assert [i for i, b in enumerate(got) if b is None] == [7, 23, 31]
    assert tier.stats.snapshot()["corrupt"] == 3
    assert tier.contains([key(7), key(23), key(31), key(8)]) == [False, False, False, True]
    assert not tier.path_of(key(7)).exists() and tier.check_integrity() == []


def test_lower_tiers_read_into_reserved_slots(tmp_path: Path) -> None:
    disk = DiskTier(LAYOUT, tmp_path, 1 << 30, read_threads=3)
    disk.put([block(i) for i in range(N)])
    cpu = CPUTier(LAYOUT, (N + 2) * LAYOUT.nbytes, pin_memory=False)
    refs = [BlockRef(key(i), block(i).token_ids) for i in range(N)]
    refs.append(BlockRef(key(999), tuple(range(8))))  # in no tier: its slot goes back
    pinned = LowerTiers(cpu, [disk]).read(refs)
    assert pinned == [key(i) for i in range(N)]
    for i in range(N):
        slot = cpu.slot_of(key(i))
        assert slot is not None and torch.equal(cpu.slab[slot], block(i).payload)
    assert cpu.slot_of(key(999)) is None and cpu.check_integrity() == []


def test_a_payload_of_whole_pages_starts_on_a_page(tmp_path: Path) -> None:
    tier = DiskTier(LAYOUT, tmp_path, 1 << 30)
    assert LAYOUT.nbytes % 4096 == 0 and tier.gap == 4096 - (152 + 4 * LAYOUT.block_size)
    tier.put([block(0), block(1)])
    data = tier.path_of(key(0)).read_bytes()
    assert len(data) == tier.file_bytes == 4096 + LAYOUT.nbytes
    assert data[4096:] == block(0).payload.numpy().tobytes() and not any(data[184:4096])
    path = tier.path_of(key(1))
    damaged = bytearray(path.read_bytes())
    damaged[1000] = 1  # in the gap: outside the checksum, still never accepted
    path.write_bytes(bytes(damaged))
    assert tier.get([key(0), key(1)])[1] is None and tier.stats.snapshot()["corrupt"] == 1
    small = BlockLayout("ab" * 32, 2, 2, 4, 4, "float16")  # 128-byte payloads: no gap
    assert DiskTier(small, tmp_path, 1 << 20).gap == 0


def _page_aligned_slab(rows: int) -> torch.Tensor:
    """A slab that starts on a page, as pinned CUDA memory does (torch's CPU one may not)."""
    import mmap

    memory = mmap.mmap(-1, rows * LAYOUT.nbytes)
    return torch.frombuffer(memory, dtype=torch.uint8).view(rows, LAYOUT.nbytes)


def test_direct_io_reads_are_byte_identical_and_checked(tmp_path: Path) -> None:
    tier = DiskTier(LAYOUT, tmp_path, 1 << 30, read_threads=4, direct_io=True)
    tier.put([block(i) for i in range(N)])
    path = tier.path_of(key(9))
    damaged = bytearray(path.read_bytes())
    damaged[-5] ^= 0x10
    path.write_bytes(bytes(damaged))
    slab = _page_aligned_slab(N)
    got = tier.get_into([key(i) for i in range(N)], list(slab))
    assert [i for i, b in enumerate(got) if b is None] == [9]
    assert all(torch.equal(slab[i], block(i).payload) for i in range(N) if i != 9)
    assert tier._direct.enabled  # ext4 (the test machines' /tmp) takes O_DIRECT
    unaligned = torch.zeros((2, LAYOUT.nbytes + 1), dtype=torch.uint8)[:, 1:]  # buffered
    assert all(b is not None for b in tier.get_into([key(0), key(1)], list(unaligned)))
    assert torch.equal(unaligned[1], block(1).payload)


def test_direct_io_falls_back_where_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A filesystem that refuses O_DIRECT (tmpfs before Linux 6.6: EINVAL at open)."""
    real_open = os.open

    def no_direct(path: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    tier = DiskTier(LAYOUT, tmp_path, 1 << 30, read_threads=2, direct_io=True)
    tier.put([block(i) for i in range(4)])
    monkeypatch.setattr(os, "open", no_direct)
    slab = _page_aligned_slab(4)
    with caplog.at_level(logging.WARNING, logger="strata.kv.tiers.disk"):
        got = tier.get_into([key(i) for i in range(4)], list(slab))
    assert all(b is not None and torch.equal(b.payload, block(i).payload)
               for i, b in enumerate(got))  # fmt: skip
    assert not tier._direct.enabled and caplog.text.count("O_DIRECT refused") == 1
    assert tier.stats.snapshot()["errors"] == 0
