"""The disk tier: one file per block, in a directory private to one model and KV layout
(one file per run of blocks was measured and not taken: docs/benchmarks.md, tier I/O).

    <directory>/
      <fingerprint[:16]>-<layout digest>/      another model or layout never lists these
        3f/
          3fa9...e1                            key hex (64 chars): block_format bytes, a
                                               zero gap after the token ids when the
                                               payload is whole pages (see below)
          3fa9...e1.<pid>.<random>.tmp         being written; renamed over the final name

Invariants:
- A file under a final name is complete: writes go to a `.tmp` file in the same shard
  directory (optionally fsync'ed) and `os.replace` publishes it atomically, so a crash
  (even `kill -9`) leaves a complete block or none, plus a `.tmp` that the next start
  deletes.
- The index (key set + eviction order) is memory only; on start it is rebuilt from the
  files, oldest mtime first. Files of the wrong size are removed then; headers and
  checksums are verified on `get`, where a bad block is a logged, removed, counted miss.
- Every file is `file_bytes` = `encoded_size(layout, secret)` + `gap` bytes, so
  `used_bytes = len(index) * file_bytes`, and sizes and byte counters here are file bytes.
  `gap` zeros put a payload of whole pages on a page boundary of its file (the page cache
  copies it out ~1.5x faster: docs/benchmarks.md, tier I/O); they are checked on read.
  Sealed blocks (decrypted whole) and payloads of partial pages have no gap.
- I/O errors never reach the caller: they are logged once per kind, counted in
  `stats.errors`, and the block is a miss (get) or skipped (put).
- Only the KV mover thread calls get/put/evict/remove; the lock guards the index for
  `contains` from the engine thread, and no I/O happens under it.
- `get`/`get_into` read their files on `read_threads` reader threads at once, each file
  with one `preadv` (header + token ids into a small buffer, the payload straight into
  its destination) and checked on the thread that read it; a reader touches the index
  only through `_forget`, under the lock.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import secrets
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from strata.kv.tiers import block_format
from strata.kv.tiers.base import BlockLayout, LockedPins, PinCounts, StoredBlock, TierStore, Timer
from strata.kv.tiers.eviction import make_eviction_order
from strata.kv.tiers.file_reads import PAGE, DirectReads, DirectRefused, read_into
from strata.kv.tiers.store_secret import StoreSecret

log = logging.getLogger(__name__)

_KEY_HEX = 64
_READ_BUFFER_BYTES = 64 << 20  # read buffers kept between calls (at least one)
# Files read at once. One thread copies ~5 GB/s from the page cache (an H200 host);
# benchmarks/tier_io_cpu.py measures 1 against N.
READ_THREADS = 8
_ZEROS = memoryview(bytes(PAGE))


def layout_digest(layout: BlockLayout) -> str:
    """16 hex chars naming everything about a layout, the full fingerprint and format version."""
    text = (
        f"v{block_format.VERSION}|{layout.fingerprint}|{layout.num_layers}|{layout.num_kv_heads}|"
        f"{layout.head_dim}|{layout.block_size}|{layout.dtype}|{layout.codec}"
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _is_key_name(name: str) -> bool:
    return len(name) == _KEY_HEX and all(c in "0123456789abcdef" for c in name)


def _writer_alive(tmp_name: str) -> bool:
    """Whether the `.tmp` file's writer (pid in its name) is another live process."""
    parts = tmp_name.split(".")
    if len(parts) != 4 or not parts[1].isdigit() or int(parts[1]) == os.getpid():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class DiskTier(LockedPins, TierStore):
    name = "disk"

    def __init__(
        self,
        layout: BlockLayout,
        directory: str | os.PathLike[str],
        capacity_bytes: int,
        eviction: str = "lru",
        fsync: bool = False,
        secret: StoreSecret | None = None,
        read_threads: int = READ_THREADS,
        direct_io: bool = False,
        slope: float = 0.0,
    ) -> None:
        """secret: authenticate every block (store_secret.py); its blocks live in a
        directory of their own. read_threads: files read (and verified) at once.
        direct_io: read with O_DIRECT where the files and slots allow (file_reads.py).
        slope: the cost eviction order's recompute cost slope. Positions are not stored
        in the files: blocks found again after a restart have an unknown one (cost: 0)."""
        self.sealed = secret is not None and secret.encrypt  # decrypted whole, not in place
        self._head_bytes = block_format.HEADER_BYTES + 4 * layout.block_size
        whole_pages = layout.nbytes % PAGE == 0 and not self.sealed
        self.gap = -self._head_bytes % PAGE if whole_pages else 0
        self.file_bytes = block_format.encoded_size(layout, secret) + self.gap
        if capacity_bytes < self.file_bytes:
            raise ValueError(
                f"the disk tier's capacity ({capacity_bytes} bytes) is smaller than one block "
                f"file ({self.file_bytes} bytes)"
            )
        super().__init__(layout, capacity_bytes)
        namespace = f"{layout.fingerprint[:16]}-{layout_digest(layout)}"
        if secret is not None:
            namespace += f"-{secret.namespace}"
        self.root = Path(directory) / namespace
        self.secret = secret
        self.fsync = fsync
        self._keys: set[bytes] = set()
        self._pins = PinCounts()
        self._order = make_eviction_order(eviction, slope)
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self._direct = DirectReads(direct_io, first_page=self._head_bytes + self.gap == PAGE)
        self._readers = ThreadPoolExecutor(read_threads, thread_name_prefix="strata-kv-disk")
        self.read_batch = 4 * read_threads
        self._buffers: list[torch.Tensor] = []  # get()'s payloads
        self._keep_buffers = max(1, _READ_BUFFER_BYTES // self.file_bytes)
        self._rebuild()

    @property
    def capacity_blocks(self) -> int:
        return self.capacity_bytes // self.file_bytes

    @property
    def used_bytes(self) -> int:
        return len(self._keys) * self.file_bytes

    @property
    def num_blocks(self) -> int:
        return len(self._keys)

    def path_of(self, key: bytes) -> Path:
        name = key.hex()
        return self.root / name[:2] / name

    # ---- start: rebuild the index from the files ----------------------------------------

    def _rebuild(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            found = list(self._scan())
        except OSError as exc:
            self._io_error("open the directory", exc)
            return
        found.sort()  # (mtime_ns, name): oldest first
        for _, name in found:
            key = bytes.fromhex(name)
            self._keys.add(key)
            self._order.inserted(key)
        while self.used_bytes > self.capacity_bytes and self._evict_one():
            pass  # the cap shrank since the last run
        log.info("disk tier %s: %d blocks found, %d files of the wrong size removed",
                 self.root, len(self._keys), self.stats.corrupt)  # fmt: skip

    def _scan(self) -> Iterator[tuple[int, str]]:
        """(mtime_ns, key hex) of each well-sized block; removes leftovers and bad sizes."""
        for shard in os.scandir(self.root):
            if not shard.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(shard.path):
                if entry.name.endswith(".tmp"):
                    if not _writer_alive(entry.name):
                        self._unlink(Path(entry.path))
                    continue
                if not _is_key_name(entry.name) or entry.name[:2] != shard.name:
                    continue  # not ours: neither indexed nor touched
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:  # removed while we list
                    continue
                if st.st_size != self.file_bytes:
                    # another format's (an upgrade may leave many: one WARNING) or cut short
                    level = logging.DEBUG if self.stats.corrupt else logging.WARNING
                    log.log(level, "disk tier: removing %s: %d bytes, a block file is %d",
                            entry.path, st.st_size, self.file_bytes)  # fmt: skip
                    self.stats.add(corrupt=1)
                    self._unlink(Path(entry.path))
                    continue
                yield st.st_mtime_ns, entry.name

    # ---- queries ----------------------------------------------------------------------

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return [k in self._keys for k in keys]

    def get(self, keys: Sequence[bytes]) -> list[StoredBlock | None]:
        """Payloads are views of this tier's read buffers, overwritten by the next `get`."""
        with self._lock:
            present = [k in self._keys for k in keys]
        while len(self._buffers) < sum(present):
            self._buffers.append(torch.empty(self.layout.nbytes, dtype=torch.uint8))
        buffers = iter(self._buffers)
        out = self._read_all(keys, [next(buffers) if p else None for p in present])
        self._buffers = self._buffers[: self._keep_buffers]  # this call's views stay valid
        return out

    def get_into(
        self, keys: Sequence[bytes], dests: Sequence[torch.Tensor]
    ) -> list[StoredBlock | None]:
        """Each block's payload is read straight into its destination (a cpu tier slot)."""
        return self._read_all(keys, dests)

    def _read_all(
        self, keys: Sequence[bytes], dests: Sequence[torch.Tensor | None]
    ) -> list[StoredBlock | None]:
        """Read the indexed keys on the reader threads, each into its `dests` entry; the
        rest miss. Stats count the batch's wall time: read_bytes_per_s is the tier's rate."""
        with self._lock:
            todo = [(k, d) for k, d in zip(keys, dests, strict=True)
                    if d is not None and k in self._keys]  # fmt: skip
        with Timer() as t:
            if len(todo) > 1:
                results = list(self._readers.map(lambda kd: self._read(*kd), todo))
            else:
                results = [self._read(k, d) for k, d in todo]
        found = {k: block for (k, _), (_, block) in zip(todo, results, strict=True)}
        out = [found.get(k) for k in keys]
        hits = sum(b is not None for b in out)
        nbytes = sum(n for n, _ in results)
        self.stats.add(hits=hits, misses=len(keys) - hits, bytes_read=nbytes,
                       read_seconds=t.seconds if nbytes else 0.0)  # fmt: skip
        with self._lock:
            for block in out:
                if block is not None and block.key in self._keys:
                    self._order.accessed(block.key)
        return out

    def _read(self, key: bytes, dest: torch.Tensor) -> tuple[int, StoredBlock | None]:
        """(bytes read, the verified block) of one file, its payload read into `dest`; a
        bad file is logged, removed and counted. Runs on a reader thread."""
        path = self.path_of(key)
        payload = memoryview(dest.numpy().data).cast("B")
        direct = self._direct.usable(dest.data_ptr())
        if direct:  # the first page (header, token ids, gap) into a page of our own
            first = self._direct.page()
            head, gap = first[: self._head_bytes], first[self._head_bytes :]
            parts = [first, payload]
        else:
            head = memoryview(bytearray(self.file_bytes if self.sealed else self._head_bytes))
            gap = memoryview(bytearray(self.gap))
            parts = [head] if self.sealed else [head, gap, payload] if self.gap else [head, payload]
        try:
            n, size = read_into(path, parts, direct)
        except DirectRefused as exc:
            self._direct.refused(exc)
            return self._read(key, dest)
        except FileNotFoundError:
            log.warning("disk tier: %s vanished (removed outside Strata?)", path)
            self._forget(key)
            return 0, None
        except OSError as exc:
            self._io_error("read a block", exc)
            return 0, None
        try:
            if size != self.file_bytes:
                raise block_format.BlockFormatError(
                    f"file is {size} bytes, expected {self.file_bytes}"
                )
            if gap != _ZEROS[: self.gap]:
                raise block_format.BlockFormatError("the gap before the payload is not zeros")
            return n, self._verified(key, head, dest)
        except block_format.BlockFormatError as exc:
            log.warning("disk tier: rejecting and deleting %s: %s", path, exc)
            self.stats.add(corrupt=1)
            self._forget(key)
            self._unlink(path)  # indexed or not: a rejected file never stays
            return n, None

    def _verified(self, key: bytes, head: memoryview, dest: torch.Tensor) -> StoredBlock:
        """The block whose header (and, sealed, whole file) is `head` and payload `dest`."""
        if self.sealed:  # decrypted whole, then copied into place
            block = block_format.decode(self.layout, head, key, self.secret)
            dest.copy_(block.payload)
            return StoredBlock(key, block.token_ids, dest)
        payload = memoryview(dest.numpy().data).cast("B")
        tokens = block_format.verify_split(self.layout, head, payload, key, self.secret)
        return StoredBlock(key, tokens, dest)

    # ---- writes ---------------------------------------------------------------------------

    def put(self, blocks: Sequence[StoredBlock]) -> None:
        for block in blocks:
            with self._lock:
                if block.key in self._keys:
                    self._order.accessed(block.key)
                    continue
            if self.capacity_bytes - self.used_bytes < self.file_bytes and not self._evict_one():
                continue  # everything is pinned
            if self._write(block):
                with self._lock:
                    self._keys.add(block.key)
                    self._order.inserted(block.key, block.position)

    def _write(self, block: StoredBlock) -> bool:
        """Write one block file atomically; False (logged, counted) on any I/O error."""
        path = self.path_of(block.key)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        buffers = block_format.encode(self.layout, block, self.secret)
        if self.gap:
            buffers.insert(1, _ZEROS[: self.gap])
        try:
            with Timer() as t:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    self._write_all(fd, buffers)
                    if self.fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, path)
                if self.fsync:
                    self._fsync_dir(path.parent)
        except OSError as exc:
            self._io_error("write a block", exc)
            with contextlib.suppress(OSError):  # else the next start deletes it
                tmp.unlink(missing_ok=True)
            return False
        self.stats.add(bytes_written=self.file_bytes, write_seconds=t.seconds)
        return True

    @staticmethod
    def _write_all(fd: int, buffers: list[memoryview]) -> None:
        for buf in buffers:
            while buf.nbytes:
                buf = buf[os.write(fd, buf) :]

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ---- pins, removal and eviction -----------------------------------------------------

    def _stores(self, key: bytes) -> bool:
        return key in self._keys

    def remove(self, keys: Sequence[bytes]) -> None:
        for key in keys:
            if self._forget(key):
                self._unlink(self.path_of(key))

    def evict(self, num_bytes: int) -> int:
        freed = 0
        while self.capacity_bytes - self.used_bytes < num_bytes and self._evict_one():
            freed += self.file_bytes
        return freed

    def _evict_one(self) -> bool:
        with self._lock:
            victim = self._order.victim(self.is_pinned)
        if victim is None:
            return False
        self.remove([victim])
        self.stats.add(evictions=1)
        return True

    def _forget(self, key: bytes) -> bool:
        """Drop a key from the index (not the file); whether it was there."""
        with self._lock:
            if key not in self._keys:
                return False
            self._keys.discard(key)
            self._pins.forget(key)
            self._order.removed(key)
            return True

    def _unlink(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            self._io_error("remove a file", exc)

    def _io_error(self, what: str, exc: OSError) -> None:
        """Count an I/O error; log each kind (errno) once at WARNING, later ones at DEBUG."""
        self.stats.add(errors=1)
        kind = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        level = logging.DEBUG if kind in self._warned else logging.WARNING
        self._warned.add(kind)
        log.log(level, "disk tier %s: could not %s (%s); a miss/skip", self.root, what, exc)

    # ---- checks ---------------------------------------------------------------------------

    def check_integrity(self) -> list[str]:
        problems = []
        with self._lock:
            keys = set(self._keys)
            ordered = set(self._order.candidates())
            if ordered != keys:
                problems.append("disk tier: the eviction order and the index disagree")
            if self._pins.keys() - keys:
                problems.append("disk tier: a pin on a key that is not stored")
        if self.used_bytes > self.capacity_bytes:
            problems.append(f"disk tier: {self.used_bytes} bytes used > {self.capacity_bytes}")
        missing = sum(not self.path_of(k).is_file() for k in keys)
        if missing:
            problems.append(f"disk tier: {missing} indexed blocks have no file")
        return problems

    def close(self) -> None:
        self._buffers = []
        self._readers.shutdown(wait=True)

    def describe(self) -> str:
        return (
            f"disk {self.capacity_bytes / (1 << 30):.2f} GiB at {self.root}, "
            f"{self.capacity_blocks} blocks"
        )
