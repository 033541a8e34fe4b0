"""`strata env`: the versions, device and KV server a bug report needs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import strata
from strata.env_report import kv_server_facts, lock_facts
from tests.redis_server import RedisServer, free_port, server_binary, server_required


def test_env_prints_versions_and_device() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "strata.cli", "env", "--json", "--kv-remote",
         f"redis://127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["strata"].startswith(strata.__version__)
    assert facts["torch"] == torch.__version__
    assert facts["transformers"] == transformers.__version__
    assert facts["python"].endswith(sys.version.split()[0])
    assert "triton" in facts and "CUDA (torch build)" in facts
    assert facts["device"].startswith("cpu") or any(k.startswith("cuda:") for k in facts)
    remote = next(v for k, v in facts.items() if k.startswith("KV server at"))
    assert remote.startswith("not reachable")


def test_env_finds_a_running_kv_server(tmp_path: Path) -> None:
    if server_binary() is None:
        if server_required():
            pytest.fail("CI needs redis-server or valkey-server: ./install.sh --test")
        pytest.skip("no redis-server or valkey-server on PATH")
    server = RedisServer(tmp_path)
    server.start()
    try:
        facts = {f.name: f.value for f in kv_server_facts(server.url)}
    finally:
        server.stop()
    assert facts[f"KV server at {server.url}"].split()[0] in ("redis", "valkey")
    assert Path(server.binary).name in facts["KV server binaries"]


def test_lock_facts_name_the_packages_that_differ(tmp_path: Path) -> None:
    (tmp_path / "requirements").mkdir()
    (tmp_path / "requirements" / "x.lock").write_text(
        f"torch=={torch.__version__}\n    # via strata\n"
        "transformers==0.0.1\nno-such-package-anywhere==1.0 ; python_version >= '3'\n"
    )
    (fact,) = lock_facts(tmp_path)
    assert fact.name == "lock x.lock"
    assert fact.value.startswith("2 of 3 differ")
    assert f"transformers {transformers.__version__} (lock 0.0.1)" in fact.value
    assert "no-such-package-anywhere not installed (lock 1.0)" in fact.value
