"""Reading one block file of the disk tier into its parts: buffered, or with O_DIRECT.

    buffered:  [header + token ids] [zero gap] [payload -> its cpu slot]   any alignment
    O_DIRECT:  [first page: header, token ids, gap -> a page of the reader's own]
               [payload, whole pages -> its cpu slot, which must start on a page]

O_DIRECT bypasses the OS page cache (reads go to the device, in parallel from the
reader threads), and needs every buffer, offset and length page-aligned. A filesystem
that refuses it (tmpfs answers EINVAL) turns it off for the tier for good.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
from pathlib import Path

log = logging.getLogger("strata.kv.tiers.disk")

PAGE = 4096


class DirectRefused(OSError):
    """The filesystem does not take O_DIRECT reads of this file."""


def read_into(path: Path, parts: list[memoryview], direct: bool = False) -> tuple[int, int]:
    """Read a file's leading bytes into `parts` in order, with as few `preadv` calls as
    the kernel allows; (bytes read, file size)."""
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    except OSError as exc:
        if direct and exc.errno == errno.EINVAL:
            raise DirectRefused(exc.errno, f"O_DIRECT refused: {exc.strerror}") from exc
        raise
    try:
        size = os.fstat(fd).st_size
        done = 0
        while parts:
            try:
                got = os.preadv(fd, parts, done)
            except OSError as exc:
                if direct and exc.errno == errno.EINVAL:
                    raise DirectRefused(exc.errno, f"O_DIRECT refused: {exc.strerror}") from exc
                raise
            if got == 0:
                break  # a short file: the caller's size check rejects it
            done += got
            while parts and got >= parts[0].nbytes:
                got -= parts[0].nbytes
                parts = parts[1:]
            if parts:
                parts[0] = parts[0][got:]
        return done, size
    finally:
        os.close(fd)


class DirectReads:
    """Whether a tier reads with O_DIRECT, and each reader thread's first-page buffer."""

    def __init__(self, wanted: bool, first_page: bool) -> None:
        """first_page: the tier's files put the payload at offset PAGE (disk.py's gap)."""
        self.enabled = wanted and first_page and hasattr(os, "O_DIRECT")
        if wanted and not self.enabled:
            log.info("disk tier: O_DIRECT needs payloads of whole pages; reads are buffered")
        self._local = threading.local()
        self._lock = threading.Lock()

    def usable(self, dest_address: int) -> bool:
        return self.enabled and dest_address % PAGE == 0

    def page(self) -> memoryview:
        """This thread's page-aligned buffer for a file's first page."""
        page = getattr(self._local, "page", None)
        if page is None:
            page = self._local.page = mmap.mmap(-1, PAGE)  # anonymous maps start on a page
        return memoryview(page)

    def refused(self, exc: DirectRefused) -> None:
        with self._lock:  # several readers may be refused at once: one warning
            if self.enabled:
                self.enabled = False
                log.warning("disk tier: %s; reading through the page cache from now on", exc)
