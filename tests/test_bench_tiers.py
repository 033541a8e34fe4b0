"""`strata bench tiers` on CPU with a tiny random model: every source and length is
reported, answers loaded from every tier equal the recomputed ones, chat answers are the
same with tiers on and off, and the tiers are really used."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from strata.cli import main
from tests.redis_server import RedisServer, server_binary, server_required

TINY = {
    "model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "initializer_range": 0.1,
    "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
LENGTHS = (16, 32)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("bench-tiers")
    config = tmp / "tiny.json"
    config.write_text(json.dumps(TINY))
    server = None
    if server_binary() is not None:
        server = RedisServer(tmp, maxmemory="16mb")
        server.start()
    elif server_required():
        pytest.fail("no redis-server or valkey-server for the remote source")
    args = [
        "bench", "tiers", "--model", f"random:{config}", "--device", "cpu", "--block-size", "4",
        "--max-num-batched-tokens", "128", "--lengths", *map(str, LENGTHS),
        "--docs-per-length", "2", "--questions", "2", "--suffix-len", "3", "--max-tokens", "2",
        "--kv-disk-dir", str(tmp / "disk"), "--chat-users", "3", "--chat-turns", "2",
        "--chat-first-len", "12", "--chat-message-len", "4", "--chat-answer-len", "2",
        "--chat-concurrency", "2", "--chat-gpu-fraction", "0.3",
        "--output", str(tmp / "report.json"), "--plot", str(tmp / "report.png"),
        "--log-level", "WARNING",
    ]  # fmt: skip
    if server is not None:
        args += ["--kv-remote", server.url]
    try:
        assert main(args) == 0
    finally:
        if server is not None:
            server.stop()
    assert (tmp / "report.png").stat().st_size > 0
    out = json.loads((tmp / "report.json").read_text())
    out["remote"] = server is not None
    return out


def test_every_source_and_length_has_a_row(report: dict[str, Any]) -> None:
    sources = {"recompute", "gpu", "cpu", "disk-warm", "disk-cold"}
    if report["remote"]:
        sources.add("remote")
    measured = {(m["source"], m["length"]) for m in report["qa"]["measures"]}
    assert measured == {(s, n) for s in sources for n in LENGTHS}
    fetched = {(r["source"], r["length"]) for r in report["qa"]["fetch"]}
    assert fetched == {(s, n) for s in sources - {"recompute", "gpu"} for n in LENGTHS}
    assert report["qa"]["notes"] and report["header"].startswith("model random:")


def test_answers_from_every_tier_equal_recompute(report: dict[str, Any]) -> None:
    for m in report["qa"]["measures"]:
        if m["source"] == "recompute":
            assert m["cached_tokens"] == 0 and m["matches_recompute"] is None
        elif m["question"] == 0:
            assert m["matches_recompute"] is True, m
        if m["source"] not in ("recompute", "gpu"):
            # the whole document (whole blocks) came from a tier, not from the GPU pool
            assert m["counters"]["tier_hit_tokens"] == m["length"], m
            assert m["cached_tokens"] == m["length"], m
    assert all(r["matches_recompute"] for r in report["qa"]["fetch"])


def test_chat_same_answers_with_tiers_and_tier_hits(report: dict[str, Any]) -> None:
    results = {r["mode"]: r for r in report["chat"]["results"]}
    assert set(results) == {"tiers-off", "cpu", "cpu+sessions"}
    assert report["chat"]["mismatches"] == {"cpu": 0, "cpu+sessions": 0}
    for r in results.values():
        assert [t["turn"] for t in r["turns"]] == [1, 2]
        assert all(len(turn) == 3 for turn in r["ttft_ms"])
    assert results["tiers-off"]["stats"]["prefix_cache_tier_hit_tokens"] == 0
    assert results["cpu"]["stats"]["prefix_cache_tier_hit_tokens"] > 0


def test_preset_lengths_fit_the_position_table(capsys: pytest.CaptureFixture[str]) -> None:
    """random:llama-3-8b holds 8192 positions; the default lengths go to 32000."""
    from argparse import Namespace

    from strata.bench.tiers import fit_to_context, model_config_dict

    args = Namespace(model="random:llama-3-8b", lengths=[8192, 16384, 32000], suffix_len=12,
                     max_tokens=4, skip_qa=False, skip_chat=False, chat_users=16, chat_turns=5,
                     chat_first_len=2048, chat_message_len=256, chat_answer_len=32)  # fmt: skip
    fitted = fit_to_context(args)
    assert args.model != "random:llama-3-8b" and args.lengths == [8192, 16384, 32000]
    config = model_config_dict(args.model)
    assert config["max_position_embeddings"] == 32016 and config["num_hidden_layers"] == 32
    assert fitted.notes and "8192 to 32016" in fitted.notes[0]
    assert fitted.temp_dir is not None and args.model.startswith(f"random:{fitted.temp_dir}")
    shutil.rmtree(fitted.temp_dir)


def test_real_weights_cut_the_lengths() -> None:
    from strata.bench.tiers_fit import fit_model

    config = {"max_position_embeddings": 8192}
    fitted = fit_model("/models/llama", config, (4096, 8192, 32000), 16, 32016)
    assert fitted.model == "/models/llama" and fitted.lengths == (4096, 8176)
    assert "8192 tokens" in fitted.notes[0]
    assert fit_model("random:x.json", config, (4096,), 16, 4112).notes == ()


def test_bench_runs_past_the_position_table(tmp_path: Any) -> None:
    """End to end on a tiny model of 32 positions with a 48-token document."""
    config = tmp_path / "short.json"
    config.write_text(json.dumps(dict(TINY, max_position_embeddings=32)))
    args = [
        "bench", "tiers", "--model", f"random:{config}", "--device", "cpu", "--block-size", "4",
        "--max-num-batched-tokens", "64", "--lengths", "48", "--docs-per-length", "1",
        "--questions", "1", "--suffix-len", "3", "--max-tokens", "2", "--no-disk",
        "--skip-chat", "--output", str(tmp_path / "r.json"), "--log-level", "WARNING",
    ]  # fmt: skip
    assert main(args) == 0
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["fit_notes"] and "32 to 53" in out["fit_notes"][0]
    assert {m["length"] for m in out["qa"]["measures"]} == {48}
    assert out["header"].startswith(f"model random:{config} ")
    raised = Path(out["args"]["model"].removeprefix("random:"))
    assert raised.name == "config.json" and not raised.exists()  # removed after the run
