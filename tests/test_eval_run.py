"""End to end on the embedded model: `strata eval ruler` and `strata eval ppl`, and
teacher-forced perplexity equal to transformers' on the same tokens."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from strata import LLM
from strata.cli import main
from strata.eval.ppl import measure_perplexity, shakespeare_texts
from strata.eval.settings import Setting
from tests.conftest import assert_no_leaks


def test_ruler_cli_sweep_writes_json_table_and_plot(tmp_path: Path, capsys: Any) -> None:
    rc = main(["eval", "ruler", "--tasks", "niah_single_1", "--length", "400",
               "--samples", "1", "--policy", "streaming", "--budget", "1,0.5",
               "--output", str(tmp_path), "--no-progress", "--device", "cpu",
               "--kv-cache-memory", "0.1", "--log-level", "WARNING"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "| strata | 400 | full |" in out and "| strata | 400 | streaming | 0.5 |" in out
    full = json.loads((tmp_path / "strata_ruler_L400_full_b1_query-aware.json").read_text())
    half = json.loads((tmp_path / "strata_ruler_L400_streaming_b0.5_query-aware.json").read_text())
    assert full["tasks"]["niah_single_1"] == 100.0  # the embedded model finds a needle in 400
    assert full["samples"][0]["score"] == 1.0
    assert half["num_samples"] == 1 and half["samples"][0]["prompt_tokens"] > 250
    # streaming keeps half the context: its final KV is about half of the full cache's
    assert half["final_kv_mib"] < 0.6 * full["final_kv_mib"]
    assert half["peak_kv_mib"] > 1.6 * half["final_kv_mib"]  # the context existed in full
    assert (tmp_path / "ruler_sweep.png").stat().st_size > 10_000
    assert (tmp_path / "ruler_table.md").read_text().startswith("| system |")


def test_teacher_forced_perplexity_equals_transformers(embedded_llm: LLM, embedded_hf: Any) -> None:
    length, context = 96, 40
    result = measure_perplexity(embedded_llm, Setting("full", 1), length, context, 2, seed=3)
    texts = shakespeare_texts(embedded_llm.get_tokenizer(), length, 2, 3)
    assert result.works == tuple(name for name, _ in texts)
    nll = []
    with torch.no_grad():
        for _, ids in texts:
            logits = embedded_hf(torch.tensor([ids])).logits[0].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            nll += [-float(logprobs[i - 1, ids[i]]) for i in range(context, length)]
    assert math.isclose(result.perplexity, math.exp(sum(nll) / len(nll)), rel_tol=1e-4)
    assert_no_leaks(embedded_llm)


def test_ppl_cli_under_a_policy(tmp_path: Path, capsys: Any) -> None:
    rc = main(["eval", "ppl", "--policy", "streaming", "--budget", "1,0.25", "--length", "128",
               "--context", "96", "--output", str(tmp_path), "--device", "cpu",
               "--kv-cache-memory", "0.1", "--log-level", "WARNING"])  # fmt: skip
    assert rc == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| 128 |")]
    assert len(rows) == 2
    full = json.loads((tmp_path / "strata_ppl_L128_full_b1.json").read_text())
    quarter = json.loads((tmp_path / "strata_ppl_L128_streaming_b0.25.json").read_text())
    assert 1 < full["perplexity"] < 1000 and quarter["perplexity"] != full["perplexity"]


def test_ruler_counts_a_recall_sequence_by_its_gpu_state(tmp_path: Path, capsys: Any) -> None:
    """A recall sequence holds no pool block: its KV on the GPU is its recall state (dense
    layers, sink, tail, summaries, working set), less than the full cache's."""
    common = ["eval", "ruler", "--tasks", "niah_single_1", "--length", "400", "--samples", "1",
              "--output", str(tmp_path), "--no-progress", "--device", "cpu",
              "--kv-cache-memory", "0.1", "--kv-recall-host-memory", "0.05",
              "--log-level", "WARNING"]  # fmt: skip
    assert main([*common, "--policy", "full"]) == 0
    assert main([*common, "--policy", "quest", "--budget", "0.25"]) == 0
    capsys.readouterr()
    full = json.loads((tmp_path / "strata_ruler_L400_full_b1_query-aware.json").read_text())
    recall = json.loads((tmp_path / "strata_ruler_L400_quest_b0.25_query-aware.json").read_text())
    assert 0 < recall["peak_kv_mib"] == recall["final_kv_mib"] < full["peak_kv_mib"]


def test_ruler_scores_prompts_loaded_from_the_tier(tmp_path: Path, capsys: Any) -> None:
    """--prefix-from tier: the prompt's full blocks come back from the cpu tier. With codec
    none the prediction is the computed one (fp32 on CPU); int8 blocks load decoded."""
    common = ["eval", "ruler", "--tasks", "niah_single_1", "--length", "400", "--samples", "1",
              "--output", str(tmp_path), "--no-progress", "--device", "cpu",
              "--kv-cache-memory", "0.1", "--log-level", "WARNING"]  # fmt: skip
    assert main(common) == 0
    tier = [*common, "--prefix-from", "tier", "--kv-cpu-memory", "0.1"]
    for codec in ("none", "int8"):
        assert main([*tier, "--kv-tier-codec", codec]) == 0
    capsys.readouterr()
    base = "strata_ruler_L400_full_b1_query-aware"
    runs = {name: json.loads((tmp_path / f"{base}{name}.json").read_text())
            for name in ("", "_tier-none", "_tier-int8")}  # fmt: skip
    prompt = runs[""]["samples"][0]["prompt_tokens"]
    assert runs[""]["tier_hit_tokens"] == 0
    for name in ("_tier-none", "_tier-int8"):
        assert runs[name]["prefix_from"] == "tier"
        assert prompt - 16 < runs[name]["tier_hit_tokens"] < prompt  # every full block
    assert runs["_tier-none"]["samples"][0]["prediction"] == runs[""]["samples"][0]["prediction"]
    assert runs["_tier-int8"]["samples"][0]["score"] == 1.0
