"""DiskTier on real files: round trip, LRU with pins, restart, damage, temp files, kill -9."""

from __future__ import annotations

import hashlib
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from strata.kv.tiers import block_format
from strata.kv.tiers.base import BlockLayout, StoredBlock
from strata.kv.tiers.disk import DiskTier, layout_digest

LAYOUT = BlockLayout(
    "ab" * 32, num_layers=2, num_kv_heads=2, head_dim=4, block_size=4, dtype="float16"
)
OTHER_MODEL = BlockLayout("cd" * 32, 2, 2, 4, 4, "float16")  # same sizes, other weights
FILE = block_format.encoded_size(LAYOUT)


def key(i: int) -> bytes:
    return hashlib.sha256(f"block {i}".encode()).digest()


def block(i: int, layout: BlockLayout = LAYOUT) -> StoredBlock:
    payload = (torch.arange(layout.nbytes, dtype=torch.int64) * (i + 7) % 251).to(torch.uint8)
    return StoredBlock(key(i), tuple(range(i, i + layout.block_size)), payload)


def stored(tier: DiskTier) -> list[int]:
    """Which of blocks 0..19 the tier holds."""
    return [i for i, hit in enumerate(tier.contains([key(i) for i in range(20)])) if hit]


def test_round_trip_files_and_stats(tmp_path: Path) -> None:
    tier = DiskTier(LAYOUT, tmp_path, capacity_bytes=10 * FILE)
    tier.put([block(0), block(1), block(2)])
    root = tmp_path / f"{'ab' * 8}-{layout_digest(LAYOUT)}"
    assert tier.root == root
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == sorted(
        f"{key(i).hex()[:2]}/{key(i).hex()}" for i in range(3)
    )
    assert tier.contains([key(1), key(5), key(0)]) == [True, False, True]

    got = tier.get([key(2), key(5), key(0)])
    assert got[1] is None
    for i, b in ((2, got[0]), (0, got[2])):
        assert b is not None
        assert b.key == key(i) and b.token_ids == block(i).token_ids
        assert b.payload.dtype == torch.uint8 and torch.equal(b.payload, block(i).payload)
    s = tier.stats.snapshot()
    assert (s["hits"], s["misses"], s["corrupt"], s["errors"]) == (2, 1, 0, 0)
    assert (s["bytes_written"], s["bytes_read"]) == (3 * FILE, 2 * FILE)
    assert tier.used_bytes == 3 * FILE and tier.check_integrity() == []


def test_other_model_or_layout_never_lists_the_files(tmp_path: Path) -> None:
    DiskTier(LAYOUT, tmp_path, 10 * FILE).put([block(0)])
    assert stored(DiskTier(OTHER_MODEL, tmp_path, 10 * FILE)) == []
    wider = BlockLayout(LAYOUT.fingerprint, 2, 2, 4, 8, "float16")  # block size 8
    assert stored(DiskTier(wider, tmp_path, 10 * block_format.encoded_size(wider))) == []
    assert stored(DiskTier(LAYOUT, tmp_path, 10 * FILE)) == [0]


def test_lru_eviction_respects_pins(tmp_path: Path) -> None:
    tier = DiskTier(LAYOUT, tmp_path, capacity_bytes=3 * FILE + FILE // 2)
    tier.put([block(0), block(1), block(2)])  # LRU order 0 1 2
    tier.get([key(0)])  # 1 2 0
    tier.pin([key(1)])
    tier.put([block(3)])  # 1 is pinned: 2 goes
    assert stored(tier) == [0, 1, 3]
    tier.put([block(4)])  # order 1 0 3: 0 goes
    assert stored(tier) == [1, 3, 4]
    assert not tier.path_of(key(0)).exists() and not tier.path_of(key(2)).exists()

    tier.pin([key(3), key(4)])
    tier.put([block(5)])  # everything pinned: skipped
    assert stored(tier) == [1, 3, 4]
    tier.unpin([key(4)])
    assert tier.evict(2 * FILE) == FILE and stored(tier) == [1, 3]  # only 4 could go
    assert tier.stats.snapshot()["evictions"] == 3
    assert tier.used_bytes == 2 * FILE and tier.check_integrity() == []


def test_restart_rebuilds_index_in_mtime_order(tmp_path: Path) -> None:
    tier = DiskTier(LAYOUT, tmp_path, capacity_bytes=3 * FILE)
    tier.put([block(0), block(1), block(2)])
    base = time.time() - 100
    for i, age in ((1, 0), (2, 10), (0, 20)):  # oldest first: 1, 2, 0
        os.utime(tier.path_of(key(i)), (base + age, base + age))
    tier.close()

    again = DiskTier(LAYOUT, tmp_path, capacity_bytes=3 * FILE)
    assert stored(again) == [0, 1, 2]
    (b,) = again.get([key(2)])
    assert b is not None and torch.equal(b.payload, block(2).payload)
    again.put([block(3)])  # order after the get: 1 0 2
    assert stored(again) == [0, 2, 3]

    smaller = DiskTier(LAYOUT, tmp_path, capacity_bytes=2 * FILE)  # the cap shrank
    assert stored(smaller) == [0, 3]  # mtimes: 2 < 0 < 3 (a get does not touch the file)
    assert smaller.stats.snapshot()["evictions"] == 1
    assert smaller.check_integrity() == []


def _flip_payload_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: FILE - 10])


def _other_model(path: Path) -> None:  # a valid block of another model, same key name
    path.write_bytes(b"".join(block_format.encode(OTHER_MODEL, block(0, OTHER_MODEL))))


def _other_key(path: Path) -> None:  # a valid block of ours, under the wrong name
    path.write_bytes(b"".join(block_format.encode(LAYOUT, block(1))))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_flip_payload_byte, "checksum mismatch"),
        (_truncate, "expected"),
        (_other_model, "model fingerprint mismatch"),
        (_other_key, "key mismatch"),
    ],
)
def test_bad_block_is_a_removed_counted_miss(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[Path], None],
    reason: str,
) -> None:
    tier = DiskTier(LAYOUT, tmp_path, capacity_bytes=10 * FILE)
    tier.put([block(0)])
    damage(tier.path_of(key(0)))
    with caplog.at_level(logging.WARNING, logger="strata.kv.tiers.disk"):
        assert tier.get([key(0)]) == [None]
    assert reason in caplog.text
    assert not tier.path_of(key(0)).exists() and tier.contains([key(0)]) == [False]
    s = tier.stats.snapshot()
    assert (s["hits"], s["misses"], s["corrupt"]) == (0, 1, 1)
    tier.put([block(0)])  # recomputed and stored again
    (b,) = tier.get([key(0)])
    assert b is not None and torch.equal(b.payload, block(0).payload)


def test_start_removes_wrong_size_files_and_leftover_temps(tmp_path: Path) -> None:
    tier = DiskTier(LAYOUT, tmp_path, capacity_bytes=10 * FILE)
    tier.put([block(0), block(1)])
    _truncate(tier.path_of(key(1)))
    shard = tier.path_of(key(0)).parent
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    stale = [
        shard / f"{key(5).hex()}.{dead}.0a1b.tmp",
        shard / f"{key(6).hex()}.{os.getpid()}.2c3d.tmp",
    ]
    live = shard / f"{key(7).hex()}.1.4e5f.tmp"  # pid 1 is alive: another writer's file
    stray = shard / "notes.txt"
    for p in [*stale, live, stray]:
        p.write_bytes(b"partial")

    again = DiskTier(LAYOUT, tmp_path, capacity_bytes=10 * FILE)
    assert stored(again) == [0]
    assert not tier.path_of(key(1)).exists() and again.stats.snapshot()["corrupt"] == 1
    assert [p.exists() for p in stale] == [False, False]
    assert live.exists() and stray.exists()


def test_unwritable_directory_is_a_logged_miss_never_an_exception(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with caplog.at_level(logging.WARNING, logger="strata.kv.tiers.disk"):
        tier = DiskTier(LAYOUT, not_a_dir, capacity_bytes=10 * FILE)
        tier.put([block(0), block(1)])
        assert tier.get([key(0)]) == [None]
    assert len(caplog.records) == 1  # one kind of error (ENOTDIR), logged once
    s = tier.stats.snapshot()
    assert (s["errors"], s["misses"], s["bytes_written"]) == (3, 1, 0)
    assert tier.used_bytes == 0


def test_full_disk_skips_the_block_and_leaves_no_file(tmp_path: Path) -> None:
    tier = DiskTier(LAYOUT, tmp_path, capacity_bytes=10 * FILE)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE // 2, hard))  # writes past it: EFBIG
    try:
        tier.put([block(0)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert tier.stats.snapshot()["errors"] == 1 and stored(tier) == []
    assert [p for p in tier.root.rglob("*") if p.is_file()] == []  # the temp file is gone too
    tier.put([block(0)])
    assert stored(tier) == [0]


WRITER = """
import sys, torch
from strata.kv.tiers.base import BlockLayout, StoredBlock
from strata.kv.tiers.block_format import encoded_size
from strata.kv.tiers.disk import DiskTier
layout = BlockLayout("ef" * 32, 8, 16, 128, 64, "float16")  # 4 MiB blocks: slow writes
tier = DiskTier(layout, sys.argv[1], capacity_bytes=16 * encoded_size(layout))  # evicts too
i = 0
while True:
    i += 1
    payload = torch.full((layout.nbytes,), i % 251, dtype=torch.uint8)
    print(i, flush=True)  # about to write block i
    tier.put([StoredBlock(i.to_bytes(32, "big"), tuple(range(64)), payload)])
"""


def _kill_mid_write(proc: subprocess.Popen[bytes], root: Path, after: int) -> None:
    """SIGKILL the writer while a block's temp file exists (block `after` or a later one)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break  # the writer died: the caller's assertions say how
        i = int(line)
        if i < after:
            continue
        name = i.to_bytes(32, "big").hex()
        shard = root / name[:2]
        while time.monotonic() < deadline:
            names = os.listdir(shard) if shard.is_dir() else []
            if any(n.startswith(name + ".") for n in names):
                proc.send_signal(signal.SIGKILL)
                return
            if name in names:
                break  # written before we looked: try the next block


def test_kill_9_during_writes_leaves_only_whole_blocks(tmp_path: Path) -> None:
    layout = BlockLayout("ef" * 32, 8, 16, 128, 64, "float16")  # the writer's
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE)
    root = tmp_path / f"{layout.fingerprint[:16]}-{layout_digest(layout)}"
    try:
        _kill_mid_write(proc, root, after=8)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    tier = DiskTier(layout, tmp_path, capacity_bytes=1 << 40)
    keys = [int.from_bytes(bytes.fromhex(p.name), "big") for p in root.glob("*/*")]
    assert len(keys) >= 7 and list(root.glob("*/*.tmp")) == []  # blocks 1..7 at least
    assert tier.num_blocks == len(keys)
    blocks = tier.get([i.to_bytes(32, "big") for i in keys])
    for i, b in zip(keys, blocks, strict=True):
        assert b is not None, f"block {i} is unreadable"
        assert b.token_ids == tuple(range(64))
        assert torch.equal(b.payload, torch.full((layout.nbytes,), i % 251, dtype=torch.uint8))
    assert tier.stats.snapshot()["corrupt"] == 0


def test_cost_eviction_keeps_late_blocks_and_restarts_without_positions(tmp_path: Path) -> None:
    # Three files, slope 1: blocks 0..2 at positions 2, 0, 1 of one prefix; block 3 evicts
    # the cheapest, block 1 (position 0). After a restart positions are unknown (0 each):
    # the order falls back to the files' age, oldest first.
    tier = DiskTier(LAYOUT, tmp_path, capacity_bytes=3 * FILE, eviction="cost", slope=1.0)
    for i, position in ((0, 2), (1, 0), (2, 1)):
        b = block(i)
        tier.put([StoredBlock(b.key, b.token_ids, b.payload, position)])
    b = block(3)
    tier.put([StoredBlock(b.key, b.token_ids, b.payload, 3)])
    assert stored(tier) == [0, 2, 3]
    tier.close()
    for age, i in enumerate((0, 2, 3)):  # oldest first: 0, 2, 3
        os.utime(tier.path_of(key(i)), ns=(10**9 * (age + 1), 10**9 * (age + 1)))
    again = DiskTier(LAYOUT, tmp_path, capacity_bytes=3 * FILE, eviction="cost", slope=1.0)
    again.put([block(4)])
    assert stored(again) == [2, 3, 4]
    assert not again.check_integrity()
