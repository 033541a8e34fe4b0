"""One request's failure ends that request alone: a KV policy or sampling row that raises
for one chosen sequence inside a busy batch fails it with a clear error, and every other
request's tokens equal those of a run without it. Engine faults (out of memory) still
raise."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from strata import LLM, SamplingParams
from strata.engine.engine import LLMEngine
from strata.engine.outputs import RequestOutput
from strata.kv.policies.h2o import H2OPolicy
from strata.kv.policies.registry import POLICIES
from tests.conftest import assert_no_leaks
from tests.server_utils import engine_factory, start_server

HOOKS = ["first_observed_token", "observed_queries", "observe", "select"]
GREEDY = {"max_tokens": 10, "temperature": 0.0, "ignore_eos": True}


class FaultyH2O(H2OPolicy):
    """H2O that raises from one hook, on its `after`-th call (class attributes set by the
    test)."""

    hook = "observe"
    after = 0
    error: type[BaseException] = ValueError

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.calls = 0

    def _maybe_raise(self) -> None:
        self.calls += 1
        if self.calls > self.after:
            raise self.error("injected fault")


def _faulty(name: str) -> Any:
    def method(self: FaultyH2O, *args: Any) -> Any:
        if self.hook == name:
            self._maybe_raise()
        return getattr(H2OPolicy, name)(self, *args)

    return method


for _name in HOOKS:
    setattr(FaultyH2O, _name, _faulty(_name))


@pytest.fixture(scope="module", autouse=True)
def _faulty_policy() -> Iterator[None]:
    POLICIES.register("faulty", FaultyH2O)
    yield
    del POLICIES._entries["faulty"]


@pytest.fixture(scope="module")
def llm(tiny_models: dict[str, Any]) -> LLM:
    folder, _ = tiny_models["llama"]
    return LLM(str(folder), device="cpu", num_kv_blocks=96, block_size=4, max_model_len=64)


def _batch() -> list[tuple[list[int], SamplingParams]]:
    """Six requests of mixed lengths and policies, run together."""
    prompts = [[(7 * i + j) % 500 + 3 for j in range(9 + 5 * i)] for i in range(6)]
    kinds: list[dict[str, Any]] = [
        {}, {"kv_policy": "h2o", "kv_budget": 8}, {"kv_policy": "snapkv", "kv_budget": 0.5},
        {"kv_policy": "faulty", "kv_budget": 8}, {"temperature": 0.8, "seed": 3}, {},
    ]  # fmt: skip
    return [(p, SamplingParams(**{**GREEDY, **k})) for p, k in zip(prompts, kinds, strict=True)]


def _run(engine: LLMEngine, batch: list[tuple[list[int], SamplingParams]]) -> dict[str, Any]:
    ids = [engine.add_request(p, params, request_id=f"r{i}") for i, (p, params) in enumerate(batch)]
    finals: dict[str, RequestOutput] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert sorted(finals) == sorted(ids)
    return finals


def _reference(engine: LLMEngine) -> dict[str, Any]:
    """The batch with the faulty request replaced by the same policy, fault-free."""
    batch = _batch()
    prompt = batch[3][0]
    batch[3] = (prompt, SamplingParams(**{**GREEDY, "kv_policy": "h2o", "kv_budget": 8}))
    return _run(engine, batch)


# A hook raising on its first call, or later in the run (mid-decode, after compaction);
# first_observed_token is asked only at admission.
FAULTS = [(hook, 0) for hook in HOOKS] + [("observed_queries", 3), ("observe", 3), ("select", 1)]


@pytest.mark.parametrize(("hook", "after"), FAULTS)
def test_a_faulty_policy_fails_its_request_alone(llm: LLM, hook: str, after: int) -> None:
    reference = _reference(llm.engine)
    FaultyH2O.hook, FaultyH2O.after, FaultyH2O.error = hook, after, ValueError
    finals = _run(llm.engine, _batch())
    bad = finals.pop("r3")
    assert bad.finish_reason == "error"
    assert bad.error == "this request failed while running: ValueError: injected fault"
    for request_id, out in finals.items():
        assert out.error is None, request_id
        assert out.token_ids == reference[request_id].token_ids, request_id
        assert out.finish_reason == "length"
    assert_no_leaks(llm)


def test_a_sampling_row_that_cannot_be_sampled_fails_alone(llm: LLM) -> None:
    reference = _reference(llm.engine)
    engine = llm.engine
    batch = _batch()
    batch[3] = (batch[3][0], SamplingParams(**{**GREEDY, "kv_policy": "h2o", "kv_budget": 8}))
    seqs = [engine.prepare(p, params, f"r{i}") for i, (p, params) in enumerate(batch)]
    seqs[3].seed = 2**40  # past SamplingParams' checks: as if a bug let it through
    for seq in seqs:
        engine.enqueue(seq)
    finals: dict[str, RequestOutput] = {}
    while engine.has_unfinished():
        finals.update((o.request_id, o) for o in engine.step() if o.finished)
    assert finals.pop("r3").error == (
        "this request failed while running: ValueError: seed 1099511627776 is not in [0, 2^32)"
    )
    assert {k: v.token_ids for k, v in finals.items()} == {
        k: v.token_ids for k, v in reference.items() if k != "r3"
    }
    assert_no_leaks(llm)


def test_snapkv_on_a_prompt_shorter_than_its_window(llm: LLM) -> None:
    params = SamplingParams(max_tokens=3, temperature=0, kv_policy="snapkv", kv_budget=2)
    out = llm.generate([[5, 6, 7, 8, 9]], params)[0]
    assert len(out.token_ids) == 3 and out.error is None
    pyramid = SamplingParams(max_tokens=3, temperature=0, kv_policy="pyramidkv", kv_budget=2)
    assert len(llm.generate([[5] * 40], pyramid)[0].token_ids) == 3
    assert_no_leaks(llm)


@pytest.mark.breaks_engine
def test_out_of_memory_is_not_blamed_on_a_request(tiny_models: dict[str, Any]) -> None:
    folder, _ = tiny_models["llama"]
    llm = LLM(str(folder), device="cpu", num_kv_blocks=96, block_size=4, max_model_len=64)
    FaultyH2O.hook, FaultyH2O.after, FaultyH2O.error = "observe", 0, torch.OutOfMemoryError
    with pytest.raises(torch.OutOfMemoryError, match="injected fault"):
        _run(llm.engine, _batch())


def test_over_http_the_faulty_request_gets_a_500_and_streams_beside_it_finish(
    tiny_chat_folder: Path,
) -> None:
    server = start_server(
        engine_factory(str(tiny_chat_folder), kv_cache_memory=0.05, max_model_len=1024)
    )
    FaultyH2O.hook, FaultyH2O.after, FaultyH2O.error = "observe", 3, ValueError
    url = f"{server.url}/v1/completions"
    good = {"prompt": "steady as she goes", "max_tokens": 24, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}  # fmt: skip
    bad = {**good, "kv_policy": "faulty", "kv_budget": 8}
    try:
        solo = httpx.post(url, json=good, timeout=60).json()["choices"][0]["token_ids"]
        with ThreadPoolExecutor(5) as pool:
            futures = [pool.submit(httpx.post, url, json=b, timeout=60)
                       for b in (good, good, bad, good, good)]  # fmt: skip
            replies = [f.result() for f in futures]
        failed = replies.pop(2)
        assert failed.status_code == 500
        assert failed.json()["error"]["message"] == (
            "this request failed while running: ValueError: injected fault"
        )
        assert [r.json()["choices"][0]["token_ids"] for r in replies] == [solo] * 4
        server.assert_no_leaks()
    finally:
        server.stop()


def test_a_tier_load_that_raises_costs_its_request_a_recompute_only(
    tiny_models: dict[str, Any], tmp_path: Path
) -> None:
    folder, _ = tiny_models["llama"]
    kw: dict[str, Any] = {"device": "cpu", "num_kv_blocks": 64, "block_size": 4,
                          "max_model_len": 64, "kv_disk_dir": str(tmp_path)}  # fmt: skip
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = [list(range(3, 40)), list(range(50, 90))]
    first = LLM(str(folder), **kw)
    reference = [o.token_ids for o in first.generate(prompts, params)]
    first.close()
    llm = LLM(str(folder), **kw)  # a fresh GPU pool: both prefixes are on disk only
    assert llm.engine.tiers is not None
    lower = llm.engine.tiers.lower
    read = lower.read
    poisoned = {r.key for r in llm.engine.kv.block_refs(prompts[0], 0, llm.engine.kv.root)}

    def failing_read(blocks: Any) -> Any:
        if any(b.key in poisoned for b in blocks):
            raise RuntimeError("injected tier fault")
        return read(blocks)

    lower.read = failing_read  # type: ignore[method-assign]
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == reference
    assert llm.stats()["prefix_cache_tier_hit_tokens"] == 36  # the other prompt's blocks
    llm.close()


def test_a_faulty_request_beside_a_recall_sequence(tiny_models: dict[str, Any]) -> None:
    """The step is rebuilt without the faulty request; the recall sequence in it is
    planned once, so it goes on as if the fault had not happened."""
    folder, _ = tiny_models["llama"]
    llm = LLM(str(folder), device="cpu", num_kv_blocks=96, block_size=4, max_model_len=64,
              kv_recall_host_memory=0.01, kv_recall_gpu_memory=0.05,
              kv_recall_dense_layers=0)  # fmt: skip
    prompt = [(11 * j) % 500 + 3 for j in range(40)]
    recall = SamplingParams(**{**GREEDY, "kv_policy": "quest", "kv_budget": 24})
    solo = llm.generate([prompt], recall)[0].token_ids
    FaultyH2O.hook, FaultyH2O.after, FaultyH2O.error = "observed_queries", 0, ValueError
    faulty = SamplingParams(**{**GREEDY, "kv_policy": "faulty", "kv_budget": 8})
    finals = _run(llm.engine, [(prompt, recall), (prompt[:20], faulty)])
    assert finals["r1"].finish_reason == "error"
    assert finals["r0"].error is None and finals["r0"].token_ids == solo
    assert_no_leaks(llm)
