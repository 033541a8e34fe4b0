"""`strata serve` as a process: SIGTERM drains requests in flight and refuses new ones."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server_utils import free_port


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError("server did not become healthy")


@pytest.mark.parametrize("tp", [1, 2])
def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(
    tiny_chat_folder: Path, tp: int
) -> None:
    """With --tensor-parallel-size 2, the worker rank is stopped too once drained."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "strata.cli", "serve", "--model", str(tiny_chat_folder),
        "--served-model-name", "tiny", "--port", str(port), "--device", "cpu",
        "--kv-cache-memory", "0.05", "--max-model-len", "1024", "--shutdown-timeout", "120",
        "--tensor-parallel-size", str(tp),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        wait_healthy(url, proc)
        body = {
            "model": "tiny", "prompt": "drain me", "max_tokens": 300, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True},
        }  # fmt: skip
        events: list[str] = []
        started = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        events.append(line)
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(30)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        refused = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "late"})
        assert refused.status_code == 503
        assert refused.json()["error"]["message"] == "the server is shutting down"
        assert httpx.get(f"{url}/health").status_code == 503
        reader.join(60)
        assert events[-1] == "data: [DONE]"
        usage = json.loads(events[-2].removeprefix("data: "))["usage"]
        assert usage["completion_tokens"] == 300
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stderr.read().decode() if proc.stderr else ""
    assert "draining 1 requests" in log and "all requests finished" in log
    if tp > 1:
        pids = re.search(r"tensor parallel: started ranks 1\.\.1 \(pids (\d+)\)", log)
        assert pids is not None, log[-3000:]
        with pytest.raises(ProcessLookupError):
            os.kill(int(pids[1]), 0)


def test_a_drain_past_its_timeout_fails_streams_with_an_error_and_done(
    tiny_chat_folder: Path,
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "strata.cli", "serve", "--model", str(tiny_chat_folder),
        "--served-model-name", "tiny", "--port", str(port), "--device", "cpu",
        "--kv-cache-memory", "0.05", "--max-model-len", "1024", "--shutdown-timeout", "2",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_healthy(url, proc)
        body = {"model": "tiny", "prompt": "never done", "max_tokens": 1000, "n": 16,
                "ignore_eos": True, "stream": True}  # fmt: skip
        events: list[tuple[float, str]] = []
        started = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        events.append((time.monotonic(), line))
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(30)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        reader.join(10)
        done_at, last = events[-1]
        assert last == "data: [DONE]"
        error = json.loads(events[-2][1].removeprefix("data: "))["error"]
        assert error["message"] == "the server shut down before this request finished"
        # the drain waits for --shutdown-timeout (2 s), then ends the stream; up to 1 s more
        # for the last events to reach the reader on a loaded 2-core machine
        assert 1.5 < done_at - sent < 3.0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stderr.read().decode() if proc.stderr else ""
    assert "shutdown timeout: failing 16 requests still in flight" in log
