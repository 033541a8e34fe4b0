"""The CI-size soak: scripts/soak.py against a `strata serve` of the tiny chat model for
60 seconds, with a CPU and a disk tier under a small GPU pool and a store secret. Every
well-formed request completes (greedy ones equal to a solo run, also when loaded from the
disk tier), every hostile one gets a 4xx, and nothing is left behind.

The GPU pool and the CPU tier hold 262 blocks each: the soak's warm-up writes twice the
GPU pool, which pushes the greedy prompts' blocks out of both, so they come back from
the disk tier.

No assertion depends on the machine's speed: the soak's warm-up runs every case once
alone and once per client thread before the timed load, so the lower bounds below hold
however few requests a slow machine gets through in the 60 seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THREADS = 6
WELL_FORMED = ("ok greedy", "ok stream", "ok n=4", "ok policy", "ok chat")


def test_soak(tiny_chat_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(os.urandom(32))
    cmd = [
        sys.executable, str(ROOT / "scripts" / "soak.py"), "--model", str(tiny_chat_folder),
        "--duration", "60", "--concurrency", str(THREADS), "--json", str(tmp_path / "soak.json"),
        "--", "--kv-cache-memory", "0.002", "--max-model-len", "1024",
        "--kv-cpu-memory", "0.002", "--kv-disk-dir", str(tmp_path / "kv"), "--kv-disk-size", "0.1",
        "--kv-store-secret-file", str(tmp_path / "secret"),
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.rstrip().endswith("PASS")
    soak = json.loads((tmp_path / "soak.json").read_text())
    outcomes = soak["outcomes"]
    assert soak["pass"] and soak["failures"] == 0, outcomes
    assert not [name for name in outcomes if name.startswith("FAIL")], outcomes
    for name in WELL_FORMED:  # once alone, once per thread
        assert outcomes[name] >= 1 + THREADS, (name, outcomes)
    assert outcomes["ok greedy"] >= 6 + 1 + THREADS  # the six prompts again after eviction
    assert outcomes["disconnected"] >= 1 + THREADS
    assert outcomes["rejected"] >= 2 * (1 + THREADS)
    assert soak["after"] == {"requests running": 0, "requests waiting": 0, "KV blocks held": 0}
    tiers = soak["tiers"]
    assert tiers["cpu tier hits"] > 0 and tiers["disk tier hits"] > 0, tiers
    assert [v for k, v in tiers.items() if k.endswith(("corrupt", "errors"))] == [0] * 4
    assert soak["rss_mib"]["growth"] <= 0.10
    assert soak["load_seconds"] >= 60
