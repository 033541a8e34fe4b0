"""The CI-size soak: scripts/soak.py against a `strata serve` of the tiny chat model for
20 seconds. Every well-formed request completes (greedy ones equal to a solo run), every
hostile one gets a 4xx, and nothing is left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_soak(tiny_chat_folder: Path) -> None:
    cmd = [
        sys.executable, str(ROOT / "scripts" / "soak.py"), "--model", str(tiny_chat_folder),
        "--duration", "20", "--concurrency", "6", "--",
        "--kv-cache-memory", "0.05", "--max-model-len", "1024",
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    counts = dict(
        (cells[1].strip(), cells[2].strip())
        for cells in (line.split("|") for line in run.stdout.splitlines())
        if len(cells) == 4
    )
    assert int(counts["ok"]) > 50 and int(counts["rejected"]) > 20, run.stdout
    assert run.stdout.rstrip().endswith("PASS")
