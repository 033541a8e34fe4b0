"""A real valkey-server or redis-server on a free loopback port, for tests.

    server = RedisServer(tmp_path, maxmemory="64mb")   # found on PATH, not started
    server.start(); server.url                         # redis://127.0.0.1:<port>/0
    server.stop(); server.start()                      # same port, empty data (--save '')
    server.pause(); server.resume()                    # SIGSTOP/SIGCONT: a server that hangs

`server_binary()` is None when neither binary is installed; tests skip then, unless the
environment sets CI or STRATA_REQUIRE_REDIS=1, where a missing server is a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # benchmarks/tier_io_cpu.py uses this module without pytest
    import pytest

BINARIES = ("valkey-server", "redis-server")


def server_binary() -> str | None:
    return next((path for name in BINARIES if (path := shutil.which(name))), None)


def server_required() -> bool:
    """CI must run the remote-tier tests, never skip them for want of a server."""
    return bool(os.environ.get("CI")) or os.environ.get("STRATA_REQUIRE_REDIS") == "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ping(port: int, timeout_s: float = 0.2) -> bool:
    """Whether a server answers PING on 127.0.0.1:port (raw RESP, no client library)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, workdir: Path, maxmemory: str = "64mb", policy: str = "allkeys-lru") -> None:
        binary = server_binary()
        if binary is None:
            raise FileNotFoundError(f"none of {', '.join(BINARIES)} is on PATH")
        self.binary = binary
        self.workdir = workdir
        self.maxmemory = maxmemory
        self.policy = policy
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.workdir), "--save", "", "--appendonly", "no",
            "--maxmemory", self.maxmemory, "--maxmemory-policy", self.policy,
            "--logfile", str(self.workdir / "server.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while not ping(self.port):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                log = (self.workdir / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.binary} exited ({self.proc.returncode}): {err}{log}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.binary} did not answer PING in {timeout_s} s")
            time.sleep(0.02)

    def stop(self) -> None:
        """Kill the server (data is gone: nothing is saved); the port is kept for start()."""
        if self.proc is None:
            return
        self.resume()
        self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def pause(self) -> None:
        """Freeze the server: connections are accepted by the kernel but never answered."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def skip_without_server() -> None:
    """Skip the test when no server binary is installed (unless one is required)."""
    import pytest

    if server_binary() is None and not server_required():
        pytest.skip("no valkey-server or redis-server on PATH")


def running_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A started server for a module-scoped fixture (`yield from` it); stopped after."""
    skip_without_server()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()
