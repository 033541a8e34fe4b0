"""KV policies under tensor parallelism (gloo, 2 ranks): rank 0's policy scores every KV
head from the ranks' gathered attention sums and every rank compacts its own heads, so
TP=2 gives TP=1's greedy tokens and compactions, with KV heads split and replicated."""

from __future__ import annotations

from pathlib import Path

import pytest

from strata import LLM, SamplingParams
from tests.conftest import assert_no_leaks, make_hf_model
from tests.test_tensor_parallel import TP_CONFIGS

ENGINE = {"device": "cpu", "block_size": 4, "num_kv_blocks": 96, "max_num_batched_tokens": 32,
          "max_model_len": 128}  # fmt: skip
# 80 tokens: longer than SnapKV's 64-token window, so its votes pick what stays.
PROMPTS = [[(7 * i + 3) % 500 for i in range(80)], [(11 * i + 5) % 500 for i in range(37)]]
STATS = ("kv_compactions", "kv_tokens_evicted", "num_generated_tokens")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name in ("llama-gqa", "llama-mqa-tied"):
        folder = tmp_path_factory.mktemp(name)
        make_hf_model(TP_CONFIGS[name]()).save_pretrained(folder)
        out[name] = folder
    return out


@pytest.mark.parametrize(
    ("name", "policies"),
    [
        ("llama-gqa", ["streaming", "snapkv", "h2o", "chunkkv", "treekv", "tova"]),
        ("llama-mqa-tied", ["h2o"]),
    ],
)
def test_policies_tp2_equal_tp1(
    name: str, policies: list[str], folders: dict[str, Path]
) -> None:
    ref = LLM(str(folders[name]), **ENGINE)
    with LLM(str(folders[name]), **ENGINE, tensor_parallel_size=2) as tp:
        for policy in policies:
            params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                    kv_policy=policy, kv_budget=0.4)  # fmt: skip
            before = {k: (ref.stats()[k], tp.stats()[k]) for k in STATS}
            want = [o.token_ids for o in ref.generate(PROMPTS, params)]
            got = [o.token_ids for o in tp.generate(PROMPTS, params)]
            assert got == want, policy
            for key, (ref_before, tp_before) in before.items():
                assert tp.stats()[key] - tp_before == ref.stats()[key] - ref_before, (policy, key)
            assert tp.stats()["kv_compactions"] > before["kv_compactions"][1], policy
        assert_no_leaks(tp)

