"""benchmarks/http_front.py's failure paths: a server or benchmark process that fails
stops the run at once, with the end of its output in the error (the server's wait is
strata.bench.server_process.wait_healthy, given its log)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from strata.bench.server_process import wait_healthy


def http_front() -> ModuleType:
    path = Path(__file__).parents[1] / "benchmarks" / "http_front.py"
    spec = importlib.util.spec_from_file_location("http_front", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_server_that_exits_fails_the_wait_at_once_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    script = "print('line', 0)\nfor i in range(1, 40): print('line', i)\nraise SystemExit(3)"
    with log.open("wb") as sink:
        server = subprocess.Popen([sys.executable, "-c", script], stdout=sink,
                                  stderr=subprocess.STDOUT)  # fmt: skip
    start = time.monotonic()
    with pytest.raises(RuntimeError) as failed:
        wait_healthy(server, 9, timeout_s=120, poll_s=0.2, log=log)
    assert time.monotonic() - start < 30  # not the 120 s a silent server gets
    lines = str(failed.value).splitlines()
    assert lines[0] == "strata serve exited with 3 before it was ready; the end of its log:"
    assert lines[1:] == [f"line {i}" for i in range(15, 40)]


def test_a_failed_benchmark_command_raises_with_its_output() -> None:
    code = "import sys; print('bad flag'); sys.exit(2)"
    with pytest.raises(RuntimeError) as failed:
        http_front().run_quiet([sys.executable, "-c", code, "x", "y"])
    assert str(failed.value) == f"{code} x y failed (2):\nbad flag"


def test_modes_run_each_http_mode_with_each_number_of_client_processes() -> None:
    modes = http_front().modes
    fronts = ["--api-server-count", "1"]
    assert modes([1, 2], True, [1]) == {
        "offline": None,
        "in-process": (["--engine-in-process"], 1),
        "process": (fronts, 1),
        "fronts=2": (["--api-server-count", "2"], 1),
    }
    assert modes([1], False, [1, 4]) == {
        "offline": None, "process, 1 clients": (fronts, 1), "process, 4 clients": (fronts, 4),
    }  # fmt: skip
