"""FrontTable: the engine process's view of its front ends, and the watch that ends the
engine once they are gone.

A front is pending (it has not said "attach" yet), attached (its pid known), or gone
(it said "bye", or its process died). Invariants:
- A front never comes back from gone; the engine sends it nothing more.
- The engine exits when every front is gone, or when its parent is gone and no front is
  attached (a front that never started cannot keep it alive); never while a front runs,
  unless the parent (or, with one front, that front) says "exit".
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from strata.engine.core.channels import pid_alive

logger = logging.getLogger("strata.engine")

POLL_S = 0.5
EXIT_GRACE_S = 10.0  # for the loop to exit cleanly before the process is ended outright


class FrontTable:
    def __init__(self, num_fronts: int) -> None:
        self._lock = threading.Lock()
        self._pids: list[int | None] = [None] * num_fronts
        self._gone = [False] * num_fronts

    def __len__(self) -> int:
        return len(self._pids)

    def attach(self, front: int, pid: int) -> None:
        with self._lock:
            if not self._gone[front]:
                self._pids[front] = pid

    def leave(self, front: int) -> bool:
        """Mark `front` gone; True if it was not gone already."""
        with self._lock:
            was_gone, self._gone[front] = self._gone[front], True
            return not was_gone

    def is_gone(self, front: int) -> bool:
        return self._gone[front]

    def live(self) -> list[int]:
        """Fronts not gone (pending or attached)."""
        return [k for k, gone in enumerate(self._gone) if not gone]

    def reap(self) -> list[int]:
        """Attached fronts whose process has died, now marked gone."""
        with self._lock:
            pids = list(enumerate(self._pids))
        return [k for k, pid in pids if pid is not None and not pid_alive(pid) and self.leave(k)]

    def should_exit(self, parent_alive: bool) -> bool:
        with self._lock:
            if all(self._gone):
                return True
            pairs = zip(self._pids, self._gone, strict=True)
            attached = any(pid is not None and not gone for pid, gone in pairs)
        return not parent_alive and not attached


def watch_fronts(table: FrontTable, parent_pid: int, send: Callable[[str, object], None]) -> None:
    """Thread: a dead front's requests are aborted ("detach"); once `should_exit`, the loop
    is told to exit, and the process ends outright if it has not within EXIT_GRACE_S."""
    while True:
        for front in table.reap():
            logger.warning("front %d is gone; aborting its requests", front)
            send("detach", front)
        if table.should_exit(os.getppid() == parent_pid):
            break
        time.sleep(POLL_S)
    logger.info("no front end is left; the engine process exits")
    send("exit", None)
    time.sleep(EXIT_GRACE_S)
    logger.warning("the engine loop did not exit within %.0f s; ending the process", EXIT_GRACE_S)
    os._exit(1)
