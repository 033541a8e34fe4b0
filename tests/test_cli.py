"""The `strata` command on the embedded model and on a tiny random model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import TINY


def _strata(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "strata.cli", *args],
        capture_output=True, text=True, input=stdin, timeout=300,
    )  # fmt: skip


def test_generate_answers_paris() -> None:
    result = _strata("generate", "What is the capital of France?")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "KV pool:" in result.stderr  # the engine logs its sizing decision


def test_chat_streams_a_reply() -> None:
    result = _strata("chat", "--max-tokens", "32", stdin="What is the capital of France?\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_bad_input_exits_with_a_message(tmp_path: Path) -> None:
    result = _strata("generate", "hi", "--model", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert "model path does not exist" in result.stderr
    result = _strata("generate", "hi", "--top-p", "0")
    assert result.returncode == 2
    assert "top_p must be in (0, 1]" in result.stderr


def test_help_lists_every_command() -> None:
    result = _strata("--help")
    assert result.returncode == 0
    for command in ("generate", "chat", "bench"):
        assert command in result.stdout


def test_bench_throughput_against_hf(tmp_path: Path) -> None:
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"model_type": "llama", **TINY}))
    out = tmp_path / "result.json"
    result = _strata(
        "bench", "throughput", "--model", f"random:{config}", "--device", "cpu",
        "--num-requests", "6", "--input-len", "8-24", "--output-len", "4-12",
        "--concurrency", "1", "3", "--compare-hf", "--kv-cache-memory", "0.01",
        "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["results"]
    assert [(r["engine"], r["concurrency"]) for r in rows] == [
        ("strata", 1), ("strata", 3), ("hf-transformers", 1), ("hf-transformers", 3),
    ]  # fmt: skip
    expected = json.loads(out.read_text())["results"][0]["output_tokens"]
    assert all(r["output_tokens"] == expected and r["num_requests"] == 6 for r in rows)
    assert "strata / hf output tok/s" in result.stdout
