"""A `strata serve` child process that benchmarks start, and wait for until it is healthy."""

from __future__ import annotations

import time
from pathlib import Path
from subprocess import Popen

import httpx


def wait_healthy(
    server: Popen[bytes], port: int, timeout_s: float = 600, poll_s: float = 0.5,
    log: Path | None = None,
) -> None:  # fmt: skip
    """Return once http://127.0.0.1:port/health answers 200; RuntimeError if the server
    exits first, TimeoutError (after killing it) if `timeout_s` passes. With `log`, the
    file the server writes its output to, the error ends with that output's last lines."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if server.poll() is not None:
            raise RuntimeError(
                f"strata serve exited with {server.returncode} before it was ready"
                + _log_end(log)
            )
        time.sleep(poll_s)
    server.kill()
    raise TimeoutError(f"strata serve did not become healthy in {timeout_s:.0f} s" + _log_end(log))


def last_lines(output: str, n: int = 25) -> str:
    """The last `n` lines of a process's output."""
    return "\n".join(output.splitlines()[-n:])


def _log_end(log: Path | None) -> str:
    if log is None:
        return ""
    return "; the end of its log:\n" + last_lines(log.read_text(errors="replace"))
