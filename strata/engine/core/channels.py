"""Where the engine process and its front ends meet: one pair of ZMQ sockets per front.

    front k --PUSH(bind to_engine)-->    PULL(connect) --> engine
    front k <--PULL(bind from_engine)--  PUSH(connect) <-- engine

Invariants:
- Each front binds its own two addresses and the engine connects to every front's; a
  connect queues messages until the front binds, so neither side waits for the other.
- The socket a command arrives on names its front: a front cannot speak for another.
- `control` (several fronts only) is the parent's: it tells the engine to exit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FrontChannel:
    """One front's two addresses: its commands to the engine, the engine's messages to it."""

    to_engine: str
    from_engine: str


@dataclass(frozen=True)
class EngineChannels:
    fronts: tuple[FrontChannel, ...]
    control: str | None = None  # the parent's "exit" (several fronts); None: front 0 owns it

    def __post_init__(self) -> None:
        if not self.fronts:
            raise ValueError("an engine needs at least one front")

    @staticmethod
    def in_dir(directory: str, num_fronts: int, control: bool = False) -> EngineChannels:
        """IPC addresses in `directory` (a private temporary folder)."""
        fronts = tuple(
            FrontChannel(f"ipc://{directory}/in-{k}", f"ipc://{directory}/out-{k}")
            for k in range(num_fronts)
        )
        return EngineChannels(fronts, f"ipc://{directory}/control" if control else None)


_HAS_PROC = Path("/proc/self/stat").exists()


def pid_alive(pid: int) -> bool:
    """The process runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not _HAS_PROC:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False  # it exited just now
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
