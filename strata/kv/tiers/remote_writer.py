"""RemoteWriter: the remote tier's writes in a process of their own.

While redis-py writes 2 MiB blocks on a thread of the engine's process, a thread that
runs small torch ops takes several times longer per iteration: every send, every
checksum and every joined value hands the GIL back and forth, and each hand-off makes
the other thread wait (benchmarks/tier_io_cpu.py, docs/benchmarks.md). So the io thread
only copies a batch's payloads into a shared ring with one torch op (which releases the
GIL) and waits; the child (remote_writer_child.py) encodes them (header, checksum or
MAC, encryption) and sends them.

    io thread: write(items) ---------------------------------> writer process
      ring half h <- the batch's payloads (one torch.stack)    (its own GIL)
      (batch id, [(slot, name, key, token ids)]) --socket---> encode, pipelined SET NX
      results <-------------- (batch id, [True|None|exception] | ("down", why))

Invariants:
- The ring has two halves; a batch fills one half, and a half is refilled only after
  the answer to the batch before it in that half arrived (the child answers in order).
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
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

import redis
import torch

from strata.kv.tiers.base import BlockLayout, StoredBlock
from strata.kv.tiers.store_secret import StoreSecret

CHILD = Path(__file__).with_name("remote_writer_child.py")
RING_BYTES = 64 << 20
START_TIMEOUT_S = 60.0  # the child imports torch; a loaded CI machine may be slow


class WriterDown(redis.ConnectionError):
    """The writer process, or the server behind it, did not answer."""


class RemoteWriter:
    def __init__(
        self,
        url: str,
        password: str | None,
        timeout_s: float,
        layout: BlockLayout,
        secret: StoreSecret | None,
    ) -> None:
        self.half = max(1, RING_BYTES // 2 // layout.nbytes)  # blocks per batch
        self.nbytes = layout.nbytes
        self.answer_timeout_s = max(5.0, 10 * timeout_s)
        self._setup = {"url": url, "password": password, "timeout_s": timeout_s,
                       "slots": 2 * self.half, "layout": layout, "secret": secret}  # fmt: skip
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._mmap: mmap.mmap | None = None
        self._ring: torch.Tensor | None = None  # [2 * half, nbytes]
        self._batch_ids = itertools.count()

    def write(self, items: Sequence[tuple[bytes, StoredBlock]]) -> list[object]:
        """SET NX each (key name, block): per item True (stored), None (already there)
        or the server's error; WriterDown if the server or the child failed."""
        try:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            return self._write(items)
        except (EOFError, OSError, WriterDown) as exc:
            self.close(kill=True)
            raise WriterDown(f"remote writer: {exc}") from exc

    def _start(self) -> None:
        self.close()
        mine, theirs = socket.socketpair()
        ring_fd = _anonymous_file()
        try:
            ring_bytes = 2 * self.half * self.nbytes
            os.ftruncate(ring_fd, ring_bytes)
            self._mmap = mmap.mmap(ring_fd, ring_bytes)
            ring = torch.frombuffer(self._mmap, dtype=torch.uint8)
            self._ring = ring.view(2 * self.half, self.nbytes)
            safe_path = ["-P"] if sys.version_info >= (3, 11) else []  # not this file's folder
            argv = [sys.executable, *safe_path, str(CHILD), str(theirs.fileno()), str(ring_fd)]
            search = os.pathsep.join(p for p in sys.path if p)  # redis, torch as here
            env = {**os.environ, "PYTHONPATH": search}
            self._proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(), ring_fd), env=env)
        finally:
            os.close(ring_fd)
            theirs.close()
        self._conn = Connection(mine.detach())
        self._conn.send(self._setup)
        if not self._conn.poll(START_TIMEOUT_S):
            raise WriterDown(f"the writer process did not start in {START_TIMEOUT_S:.0f} s")
        self._conn.recv()

    def _write(self, items: Sequence[tuple[bytes, StoredBlock]]) -> list[object]:
        assert self._conn is not None and self._ring is not None
        results: list[object] = [None] * len(items)
        inflight: deque[tuple[int, range]] = deque()  # (batch id, its items), oldest first
        down: str | None = None
        for k, lo in enumerate(range(0, len(items), self.half)):
            if len(inflight) == 2:  # the oldest batch used this half
                down = self._collect(inflight, results)
            if down is not None:
                break
            batch = range(lo, min(lo + self.half, len(items)))
            first = (k % 2) * self.half
            torch.stack([items[i][1].payload for i in batch],
                        out=self._ring[first : first + len(batch)])  # fmt: skip
            batch_id = next(self._batch_ids)
            message = [(first + j, items[i][0], items[i][1].key, items[i][1].token_ids)
                       for j, i in enumerate(batch)]  # fmt: skip
            self._conn.send((batch_id, message))
            inflight.append((batch_id, batch))
        while inflight:
            down = self._collect(inflight, results) or down
        if down is not None:
            raise WriterDown(down)
        return results

    def _collect(self, inflight: deque[tuple[int, range]], results: list[object]) -> str | None:
        """Take the oldest batch's answer into `results`; why the server is down, if so."""
        assert self._conn is not None
        if not self._conn.poll(self.answer_timeout_s):
            raise WriterDown(f"no answer in {self.answer_timeout_s:.0f} s")
        batch_id, answer = self._conn.recv()
        expected, batch = inflight.popleft()
        if batch_id != expected:
            raise WriterDown(f"answer to batch {batch_id}, expected {expected}")
        if isinstance(answer, tuple):
            return str(answer[1])
        for i, result in zip(batch, answer, strict=True):
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
        self._mmap = None  # unmapped when the last view goes


def _anonymous_file() -> int:
    """A descriptor of memory-backed file without a name (memfd on Linux)."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("strata-kv-ring")
    fd, path = tempfile.mkstemp(prefix="strata-kv-ring-")
    os.unlink(path)
    return fd
