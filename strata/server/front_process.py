"""One HTTP front process of `strata serve --api-server-count N` (api_fronts.py starts N):
the usual FastAPI app and DrainingServer, on the listening socket its parent bound, with
a ProcessEngine client attached to the shared engine process.

Invariants:
- A front ignores SIGINT and SIGTERM: a terminal (Ctrl-C) or a service manager sends
  them to every process of the group or cgroup, and a front must count one drain
  request per signal the parent got. It drains on DRAIN_SIGNAL, which only the parent
  sends; a second DRAIN_SIGNAL stops it at once (as a second SIGTERM does with one front).
- A front whose parent is gone (killed outright) drains and exits on its own; the
  engine then sees every front gone and exits too: nothing is left behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Generator

from strata.engine.core.client import ProcessEngine, SharedEngine
from strata.server.config import ServeConfig
from strata.server.serve import DrainingServer, FrontSpec, serve

logger = logging.getLogger("strata.server")

DRAIN_SIGNAL = signal.SIGUSR1
PARENT_POLL_S = 0.5


class FrontServer(DrainingServer):
    """DrainingServer that takes its signals from the parent only (DRAIN_SIGNAL)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(DRAIN_SIGNAL, self.handle_exit)
        yield


def run_front(
    index: int, shared: SharedEngine, sock: socket.socket, model_name: str,
    config: ServeConfig, log_level: str, parent_pid: int,
) -> None:  # fmt: skip
    """The spawned front's main; its exit status is serve's."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(
        level=log_level.upper(), datefmt="%H:%M:%S", stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s %(name)s (front {index}): %(message)s",
    )  # fmt: skip
    threading.Thread(target=_drain_without_parent, args=(parent_pid,), daemon=True).start()
    engine = ProcessEngine(shared, config.max_waiting_requests)
    code = serve(engine, model_name, config, log_level, FrontSpec(index, sock, FrontServer))
    # Everything is closed: skip the interpreter's teardown (seconds with torch loaded).
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)


def _drain_without_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    logger.warning("the parent process (pid %d) is gone; draining", parent_pid)
    os.kill(os.getpid(), DRAIN_SIGNAL)
