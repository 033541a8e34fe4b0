"""RemoteWriter: the remote tier's writes in a process of their own.

Measured (benchmarks/tier_io_cpu.py): while redis-py writes 2 MiB blocks on a thread of
the engine's process, a thread that runs small torch ops takes 2.6-4x longer per
iteration, because every send hands the GIL back and forth; with the SETs in another
process it is about as fast as idle. So the io thread only copies each encoded block
into a shared ring (a torch copy, which releases the GIL) and waits; the child
(remote_writer_child.py) sends the values straight from the ring.

    io thread: put(items) -----------------------------------> writer process
      ring slot <- header + payload (copy_)                    (redis-py, its own GIL)
      (batch id, [(offset, name, nbytes)]) --socketpair------> pipelined SET NX
      results <----------------- (batch id, [True|None|exception] | ("down", why))

Invariants:
- A ring slot is written only while no batch in flight uses it: a slot goes back to
  the free list when the answer of its batch arrives.
- At most two half-ring batches are in flight, so the child always has the next batch
  while the parent fills the one after.
- Any failure of the child (no answer within `answer_timeout_s`, death, a broken socket)
  raises `WriterDown`, a redis.ConnectionError: the tier goes down as for a network
  error, and the next write starts a fresh child.
"""

from __future__ import annotations

import itertools
import mmap
import os
import socket
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

import redis
import torch

CHILD = Path(__file__).with_name("remote_writer_child.py")
RING_BYTES = 64 << 20
SMALL_PART_BYTES = 64 << 10  # copied without releasing the GIL
START_TIMEOUT_S = 30.0  # the child imports redis only; a loaded CI machine may be slow


class WriterDown(redis.ConnectionError):
    """The writer process, or the server behind it, did not answer."""


class RemoteWriter:
    def __init__(self, url: str, password: str | None, timeout_s: float, value_bytes: int) -> None:
        self.value_bytes = value_bytes
        self.slots = max(2, RING_BYTES // value_bytes)
        self.answer_timeout_s = max(5.0, 10 * timeout_s)
        self._setup = {"url": url, "password": password, "timeout_s": timeout_s,
                       "ring_bytes": self.slots * value_bytes}  # fmt: skip
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._mmap: mmap.mmap | None = None
        self._ring: torch.Tensor | None = None
        self._view = memoryview(b"")  # the ring, for small copies
        self._batch_ids = itertools.count()

    def write(self, items: Sequence[tuple[bytes, Sequence[memoryview]]]) -> list[object]:
        """SET NX each (key name, value parts): per item True (stored), None (already
        there) or the server's error; WriterDown if the server or the child failed."""
        try:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            return self._write(items)
        except (EOFError, OSError, WriterDown) as exc:
            self.close(kill=True)
            raise WriterDown(f"remote writer: {exc}") from exc

    def _start(self) -> None:
        self.close()
        ring_bytes = self._setup["ring_bytes"]
        assert isinstance(ring_bytes, int)
        mine, theirs = socket.socketpair()
        ring_fd = _anonymous_file()
        try:
            os.ftruncate(ring_fd, ring_bytes)
            self._mmap = mmap.mmap(ring_fd, ring_bytes)
            self._ring = torch.frombuffer(self._mmap, dtype=torch.uint8)
            self._view = memoryview(self._mmap)
            safe_path = ["-P"] if sys.version_info >= (3, 11) else []  # not this file's folder
            argv = [sys.executable, *safe_path, str(CHILD), str(theirs.fileno()), str(ring_fd)]
            self._proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(), ring_fd))
        finally:
            os.close(ring_fd)
            theirs.close()
        self._conn = Connection(mine.detach())
        self._conn.send(self._setup)
        if not self._conn.poll(START_TIMEOUT_S):
            raise WriterDown(f"the writer process did not start in {START_TIMEOUT_S:.0f} s")
        self._conn.recv()

    def _write(self, items: Sequence[tuple[bytes, Sequence[memoryview]]]) -> list[object]:
        results: list[object] = [None] * len(items)
        free = list(range(self.slots - 1, -1, -1))
        inflight: dict[int, list[tuple[int, int]]] = {}  # batch id -> (item, slot)
        batch: list[tuple[int, int, bytes, int]] = []
        down: str | None = None
        for i, (name, parts) in enumerate(items):
            while not free and down is None:
                down = self._collect(inflight, free, results)
            if down is not None:
                break
            slot = free.pop()
            batch.append((i, slot, name, self._fill(slot, parts)))
            if len(batch) == self.slots // 2 or i == len(items) - 1:
                self._send(batch, inflight)
                batch = []
        while inflight:
            down = self._collect(inflight, free, results) or down
        if down is not None:
            raise WriterDown(down)
        return results

    def _fill(self, slot: int, parts: Sequence[memoryview]) -> int:
        """Copy a value's parts into a ring slot; its length. Large parts go by torch
        copy_ (the GIL is released), small ones by memoryview: each GIL release costs the
        engine thread a hand-off, so there are as few as possible."""
        assert self._ring is not None and self._mmap is not None
        start = offset = slot * self.value_bytes
        for part in parts:
            end = offset + part.nbytes
            if end > start + self.value_bytes:
                raise ValueError(f"a value is longer than a ring slot ({self.value_bytes} B)")
            if part.nbytes < SMALL_PART_BYTES:
                self._view[offset:end] = part
            else:
                with warnings.catch_warnings():  # read-only sources are only read
                    warnings.simplefilter("ignore", UserWarning)
                    self._ring[offset:end].copy_(torch.frombuffer(part, dtype=torch.uint8))
            offset = end
        return offset - start

    def _send(
        self, batch: list[tuple[int, int, bytes, int]], inflight: dict[int, list[tuple[int, int]]]
    ) -> None:
        assert self._conn is not None
        batch_id = next(self._batch_ids)
        inflight[batch_id] = [(i, slot) for i, slot, _, _ in batch]
        items = [(slot * self.value_bytes, name, n) for _, slot, name, n in batch]
        self._conn.send((batch_id, items))

    def _collect(
        self, inflight: dict[int, list[tuple[int, int]]], free: list[int], results: list[object]
    ) -> str | None:
        """Take one batch's answer: its slots are free again; why the server is down."""
        assert self._conn is not None
        if not self._conn.poll(self.answer_timeout_s):
            raise WriterDown(f"no answer in {self.answer_timeout_s:.0f} s")
        batch_id, answer = self._conn.recv()
        entries = inflight.pop(batch_id)
        free.extend(slot for _, slot in entries)
        if isinstance(answer, tuple):
            return str(answer[1])
        for (i, _), result in zip(entries, answer, strict=True):
            results[i] = result
        return None

    def close(self, kill: bool = False) -> None:
        """Stop the child (it exits when its socket closes; `kill`: at once, as after a
        failure); a later write starts another."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            if kill:
                self._proc.kill()
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        self._ring = None
        self._view = memoryview(b"")
        self._mmap = None  # unmapped when the last view goes


def _anonymous_file() -> int:
    """A descriptor of memory-backed file without a name (memfd on Linux)."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("strata-kv-ring")
    fd, path = tempfile.mkstemp(prefix="strata-kv-ring-")
    os.unlink(path)
    return fd
