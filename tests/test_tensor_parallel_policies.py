"""KV policies under tensor parallelism (gloo, 2 ranks): rank 0's policy scores every KV
head from what the ranks gather (attention sums or maxima, or queries, keys and values),
every rank compacts its own heads, and the workers attend over rank 0's layer layouts
(PyramidKV), so TP=2 gives TP=1's greedy tokens, logits and compactions, with KV heads
split and replicated. Recall policies: every rank keeps its own recall store over its
heads, the workers mirror rank 0's admissions, chunks and releases, and TP=2 gives TP=1's
greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from strata import LLM, SamplingParams
from strata.engine.tp.step_wire import StepInputs
from strata.errors import InvalidRequestError
from strata.kv.policies.pyramidkv import PyramidKVPolicy
from strata.kv.sizing import GIB
from tests.conftest import assert_no_leaks, make_hf_model
from tests.test_hf_equality import _record_logits
from tests.test_recall import PROMPT as LONG
from tests.test_recall import assert_recall_idle
from tests.test_tensor_parallel import TP_CONFIGS

ENGINE = {"device": "cpu", "block_size": 4, "num_kv_blocks": 96, "max_num_batched_tokens": 32,
          "max_model_len": 128}  # fmt: skip
# 80 tokens: longer than SnapKV's 64-token window, so its votes pick what stays.
PROMPTS = [
    [(7 * i + 3) % 500 for i in range(80)],
    [(11 * i + 5) % 500 for i in range(37)],
    [(13 * i + 1) % 500 for i in range(21)],
]
STATS = ("kv_compactions", "kv_tokens_evicted", "num_generated_tokens", "kv_reconstruction_tokens")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name in ("llama-gqa", "llama-mqa-tied"):
        folder = tmp_path_factory.mktemp(name)
        make_hf_model(TP_CONFIGS[name]()).save_pretrained(folder)
        out[name] = folder
    return out


def spy_layer_layouts(tp: LLM) -> list[bool]:
    """Per step sent to the workers: whether its layers attend over different KV."""
    parallel = tp.engine.parts.parallel
    assert parallel is not None
    sent: list[bool] = []
    send = parallel.send

    def recording(step: StepInputs) -> None:
        sent.append(len(step.layer_of) > 0)
        send(step)

    parallel.send = recording  # type: ignore[method-assign]
    return sent


@pytest.mark.parametrize(
    ("name", "policies"),
    [
        ("llama-gqa", ["streaming", "snapkv", "h2o", "chunkkv", "treekv", "tova", "pyramidkv",
                       "expected_attention", "kvzip"]),
        ("llama-mqa-tied", ["h2o", "expected_attention", "kvzip"]),  # sums, keys, maxima
    ],
)  # fmt: skip
def test_policies_tp2_equal_tp1(
    name: str, policies: list[str], folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy tokens, every step's logits (within 1e-4) and the KV stats of TP=1, for three
    requests of different lengths batched together; PyramidKV's steps whose layers differ
    (an 8-token window leaves the two longer prompts room for uneven budgets) reach the
    workers as such."""
    monkeypatch.setattr(PyramidKVPolicy, "WINDOW", 8)
    ref = LLM(str(folders[name]), **ENGINE)
    with LLM(str(folders[name]), **ENGINE, tensor_parallel_size=2) as tp:
        want_logits, got_logits = _record_logits(ref), _record_logits(tp)
        uneven = spy_layer_layouts(tp)
        for policy in policies:
            params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                    kv_policy=policy, kv_budget=0.4)  # fmt: skip
            before = {k: (ref.stats()[k], tp.stats()[k]) for k in STATS}
            del want_logits[:], got_logits[:], uneven[:]
            want = [o.token_ids for o in ref.generate(PROMPTS, params)]
            got = [o.token_ids for o in tp.generate(PROMPTS, params)]
            assert got == want, policy
            assert len(got_logits) == len(want_logits), policy
            for mine, theirs in zip(got_logits, want_logits, strict=True):
                assert (mine - theirs).abs().max().item() < 1e-4, policy
            for key, (ref_before, tp_before) in before.items():
                assert tp.stats()[key] - tp_before == ref.stats()[key] - ref_before, (policy, key)
            assert tp.stats()["kv_compactions"] > before["kv_compactions"][1], policy
            assert any(uneven) == (policy == "pyramidkv"), policy
        assert tp.stats()["kv_reconstruction_tokens"] > 0  # kvzip's passes ran on every rank
        assert_no_leaks(tp)


RECALL_ENGINE = {"device": "cpu", "block_size": 4, "num_kv_blocks": 200,
                 "max_num_batched_tokens": 64, "kv_recall_gpu_memory": 0.05,
                 "kv_recall_dense_layers": 1}  # fmt: skip
# 64 host slots: a block of the one sparse layer, K and V, 16 float32 dims per KV head
RECALL_SLOT_BYTES = 2 * 4 * 16 * 4


@pytest.mark.parametrize("name", ["llama-gqa", "llama-mqa-tied"])
def test_recall_policies_tp2_equal_tp1(name: str, folders: dict[str, Path]) -> None:
    """Quest, shadowkv and full_offload at a 40-token budget (10 of 36 middle blocks per
    head and step: they select), batched with a plain and a SnapKV request, over one dense
    and one sparse layer: TP=2's greedy tokens are TP=1's, with KV heads split (each rank
    selects for its own) and replicated (a head's GQA group spans its ranks). The store's
    64 blocks hold quest's 44 or shadowkv's 36, not both: shadowkv waits for quest's
    release, which the workers must follow to admit it. Rank 0's recall stats are a
    single rank's per head; its store holds as many blocks as TP=1's, of its heads;
    nothing stays held. TP=1 runs without prefix caching, as TP=2's store does (it shares
    no prefix: tests/test_recall_prefix.py): its slots then span the sparse layer alone."""
    prompts = [LONG, LONG[:90], LONG[30:], LONG[10:120], LONG[5:85]]
    greedy = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}
    params = [
        SamplingParams(kv_policy="quest", kv_budget=40, **greedy),
        SamplingParams(**greedy),
        SamplingParams(kv_policy="shadowkv", kv_budget=40, **greedy),
        SamplingParams(kv_policy="full_offload", kv_budget=1, **greedy),
        SamplingParams(kv_policy="snapkv", kv_budget=0.5, **greedy),
    ]
    heads = 2 if name == "llama-gqa" else 1  # of the model; each rank holds one
    options = {**RECALL_ENGINE, "kv_recall_host_memory": (64 * RECALL_SLOT_BYTES * heads + 1) / GIB}
    ref = LLM(str(folders[name]), **options, enable_prefix_caching=False)
    want = [o.token_ids for o in ref.generate(prompts, params)]
    with LLM(str(folders[name]), **options, tensor_parallel_size=2) as tp:
        assert [o.token_ids for o in tp.generate(prompts, params)] == want
        mine, theirs = tp.stats(), ref.stats()
        assert mine["recall_host_bytes"] * heads == theirs["recall_host_bytes"]
        assert theirs["recall_host_bytes"] == 64 * RECALL_SLOT_BYTES * heads
        for key in ("recall_decode_steps", "recall_blocks_attended_per_step"):
            assert mine[key] == theirs[key], key
        assert mine["recall_decode_steps"] == 3 * (greedy["max_tokens"] - 1)
        assert_recall_idle(tp)


def test_recall_pages_tp2_equal_tp1(folders: dict[str, Path]) -> None:
    """Three quest requests of one room (150, 149 and 148 tokens + 24) share a page of
    three rows on every rank: the workers make rank 0's page from the rows it sends, and
    with the model's one KV head replicated, each page step joins the ranks' scores. TP=2's
    greedy tokens are TP=1's, and nothing stays held."""
    prompts = [LONG, LONG[1:], LONG[2:]]
    params = SamplingParams(kv_policy="quest", kv_budget=40, max_tokens=24, temperature=0,
                            ignore_eos=True)  # fmt: skip
    options = {**RECALL_ENGINE, "kv_recall_host_memory": (160 * RECALL_SLOT_BYTES + 1) / GIB}
    ref = LLM(str(folders["llama-mqa-tied"]), **options)
    want = [o.token_ids for o in ref.generate(prompts, params)]
    with LLM(str(folders["llama-mqa-tied"]), **options, tensor_parallel_size=2) as tp:
        seen = set()
        engine = tp.engine
        for prompt in prompts:
            engine.add_request(prompt, params)
        while engine.has_unfinished():
            engine.step()
            stats = tp.stats()
            seen.add((int(stats["recall_pages"]), int(stats["recall_sequences"])))
        assert (1, 3) in seen and max(pages for pages, _ in seen) == 1  # one page, 3 rows
        assert [o.token_ids for o in tp.generate(prompts, params)] == want
        assert_recall_idle(tp)


def test_magicpig_is_refused_under_tensor_parallelism(folders: dict[str, Path]) -> None:
    """magicpig attends its samples on rank 0's host alone: a request for it gets a clear
    error, and the engine serves the next request."""
    options = {**RECALL_ENGINE, "kv_recall_host_memory": (64 * RECALL_SLOT_BYTES + 1) / GIB}
    greedy = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
    with LLM(str(folders["llama-gqa"]), **options, tensor_parallel_size=2) as tp:
        with pytest.raises(InvalidRequestError, match=r"magicpig.*tensor parallelism"):
            tp.generate([LONG], SamplingParams(kv_policy="magicpig", kv_budget=40, **greedy))
        assert len(tp.generate([LONG[:20]], SamplingParams(**greedy))[0].token_ids) == 4
        assert_recall_idle(tp)
