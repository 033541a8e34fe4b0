"""Prefix sharing in the recall store (strata/kv/recall/prefix_sharing.py, prefix_copy.py,
published.py, host_store.py): requests whose prompts start alike store that prefix once
on the host, and a later one computes only what follows it.

Exact where it must be: a request reusing a published prefix gives the greedy tokens it
gives alone without sharing (quest, shadowkv, full_offload; the tiny model in fp32 and
the embedded model), computes only its own tokens, and the store holds each unique block
once; salted requests never meet; aborting the publisher leaves the reuser exact;
nothing leaks, and what stays cached is reclaimable; under tensor parallelism sharing is
off and TP=2 still gives TP=1's tokens.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from strata import LLM, SamplingParams
from strata.errors import InvalidRequestError
from strata.kv.prefix import BlockRef
from strata.kv.recall.host_store import HostKVStore, HostStoreFullError
from strata.kv.recall.manager import RecallManager
from strata.kv.recall.published import PublishedBlock
from strata.kv.recall.sequence import RecallChunk, RecallSequence
from strata.kv.sizing import GIB
from strata.server.metrics import ServerMetrics
from tests.conftest import make_hf_model
from tests.test_recall import BLOCK, GREEDY, PROMPT, assert_recall_idle, recall_llm, tokens
from tests.test_tensor_parallel import TP_CONFIGS
from tests.test_tensor_parallel_policies import RECALL_ENGINE

DOC = PROMPT[:120]  # the shared prefix: 30 blocks of 4
FIRST = [*DOC, 7, 8, 9, 10, 11, 12, 13]  # 127 tokens: 31 full blocks
SECOND = [*DOC, *range(21, 32)]  # 131 tokens: 32 full blocks
SHARED = len(DOC) // BLOCK
SLOT_BYTES = 4 * 2 * BLOCK * 16 * 4  # every layer (4), 2 KV heads of 16 float32 dims


def params(policy: str, **kw: Any) -> SamplingParams:
    return SamplingParams(**{"kv_policy": policy, "kv_budget": 40, **GREEDY, **kw})  # 10 blocks


def alone(folder: Path, prompt: list[int], sp: SamplingParams) -> list[int]:
    """The request's tokens on an engine that shares nothing."""
    return tokens(recall_llm(folder, enable_prefix_caching=False), [prompt], [sp])[0]


def recall_of(llm: LLM) -> RecallManager:
    recall = llm.engine.parts.recall
    assert recall is not None
    return recall


def spy_chunks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """(request, start, end) of every recall chunk planned from now on."""
    planned: list[tuple[str, int, int]] = []
    plan = RecallSequence.plan

    def recording(self: RecallSequence, start: int, end: int) -> RecallChunk:
        planned.append((self.owner, start, end))
        return plan(self, start, end)

    monkeypatch.setattr(RecallSequence, "plan", recording)
    return planned


def until_prompt_done(llm: LLM, request_id: str) -> None:
    seq = llm.engine._seqs[request_id]
    while seq.num_output_tokens == 0:
        llm.engine.step()


def run_out(llm: LLM, request_id: str) -> list[int]:
    """Step the engine until nothing is left; the request's tokens."""
    out: list[int] = []
    while llm.engine.has_unfinished():
        out = next((o.token_ids for o in llm.engine.step() if o.request_id == request_id), out)
    return out


# ---- the store ---------------------------------------------------------------------------


def test_store_slots_are_refcounted_cached_and_evicted_deepest_first() -> None:
    store = HostKVStore(8, 1, 1, BLOCK, 2, torch.float32, pin=False)
    assert store.allocate("a", 4) == [0, 1, 2, 3]  # blocks 0, 1: keys in 0, 1, values 2, 3
    refs = [BlockRef(bytes([i]) * 32, (i,) * BLOCK, i) for i in range(2)]
    blocks = [PublishedBlock(r.key, r.token_ids, i, i + 2) for i, r in enumerate(refs)]
    assert store.publish("a", blocks) == 2
    assert store.publish("a", blocks[:1]) == 0  # indexed already: the first copy stays
    assert store.leading(refs) == blocks
    assert store.leading([BlockRef(refs[0].key, (9,) * BLOCK)]) == []  # other tokens: a miss
    store.hold("b", [0, 2])  # b reuses block 0
    assert store.num_shared == 2 and store.owned("b") == [0, 2]
    with pytest.raises(RuntimeError, match="cannot hold host slot 4"):
        store.hold("b", [4])  # not published
    store.give_back("a", [1, 3, 0, 2])  # deepest block first
    assert (store.num_free, store.num_cached, store.num_shared) == (4, 2, 0)  # block 1 cached
    store.free("b")
    assert store.num_cached == 4 and store.used_bytes == 0 and store.check_integrity() == []
    # free slots first, then the least recently released cached one: block 1's key slot;
    # block 1 leaves the index and its value slot becomes free
    assert store.allocate("c", 5) == [4, 5, 6, 7, 1]
    assert (store.num_free, store.num_cached, len(store.index), store.num_evicted) == (1, 2, 1, 2)
    assert store.allocate("d", 3) == [3, 0, 2]  # then block 0 goes
    assert len(store.index) == 0 and store.num_evicted == 4
    with pytest.raises(HostStoreFullError, match="0 free slots of 8; 1 asked for"):
        store.allocate("e", 1)
    assert store.check_integrity() == []
    store._refs[4] += 1  # a reference nobody owns
    assert any("refcounts" in p for p in store.check_integrity())


# ---- the engine ------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["quest", "shadowkv", "full_offload"])
def test_a_shared_prefix_is_computed_once_and_decodes_as_alone(
    recall_folder: Path, policy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second request reuses the first's 30 document blocks: it computes only its 11
    own prompt tokens, and both give their greedy tokens alone without sharing. After
    both, the store caches each unique full prompt block once (31 + 2), no slot held."""
    sp = params(policy)
    want = [alone(recall_folder, p, sp) for p in (FIRST, SECOND)]
    llm = recall_llm(recall_folder)
    planned = spy_chunks(monkeypatch)
    assert tokens(llm, [FIRST], [sp]) == [want[0]]
    assert sum(end - start for _, start, end in planned) == len(FIRST) + GREEDY["max_tokens"] - 1
    del planned[:]
    second = llm.generate([SECOND], sp)[0]
    assert second.token_ids == want[1]
    assert second.num_cached_tokens == len(DOC)
    prefill = [(start, end) for _, start, end in planned if start < len(SECOND)]
    assert prefill[0][0] == len(DOC)
    assert sum(end - start for start, end in prefill) == len(SECOND) - len(DOC)
    stats = llm.stats()
    assert stats["recall_prefix_blocks_reused"] == SHARED
    assert stats["recall_prefix_blocks_published"] == stats["recall_prefix_blocks_indexed"] == 33
    assert stats["recall_host_bytes_cached"] == 2 * 33 * SLOT_BYTES
    assert_recall_idle(llm)


def test_host_slots_hold_each_unique_block_once(recall_folder: Path) -> None:
    """While both run, the first holds a key and a value slot for each of its 38 blocks
    (127 + 24 tokens) and the second only for its 9 own (131 + 24 tokens: 39 blocks, 30
    of them the first's): 94 slots held, the 60 of the document shared. Afterwards every
    cached slot is reclaimable: allocation evicts them all."""
    llm = recall_llm(recall_folder)
    store = recall_of(llm).store
    assert store.bytes_per_slot == SLOT_BYTES
    first = llm.engine.add_request(FIRST, params("quest"))
    until_prompt_done(llm, first)
    second = llm.engine.add_request(SECOND, params("quest"))
    llm.engine.step()
    stats = llm.stats()
    assert stats["recall_host_bytes_used"] == (2 * 38 + 2 * 9) * SLOT_BYTES
    assert stats["recall_host_slots_shared"] == 2 * SHARED
    kv = llm.engine._seqs[second].recall
    assert kv is not None and kv.state is not None
    assert kv.state.key_slots[:SHARED] == store.owned(first)[:SHARED]
    llm.check_integrity()
    run_out(llm, second)
    assert_recall_idle(llm)
    assert (store.num_cached, store.num_free) == (2 * 33, store.num_slots - 2 * 33)
    everything = store.allocate("probe", store.num_slots)
    assert sorted(everything) == list(range(store.num_slots))
    assert len(store.index) == 0 and store.num_evicted == 2 * 33
    store.free("probe")
    assert store.num_free == store.num_slots and store.check_integrity() == []


@pytest.mark.parametrize("policy", ["quest", "shadowkv"])
def test_abort_or_preemption_around_a_shared_prefix_keeps_the_reuser_exact(
    recall_folder: Path, policy: str
) -> None:
    """The first request is aborted while the second holds its prefix: the second keeps
    its references (the document stays in the store), is preempted and resumes, and gives
    its tokens alone; nothing leaks."""
    sp = params(policy)
    want = alone(recall_folder, SECOND, sp)
    llm = recall_llm(recall_folder)
    store = recall_of(llm).store
    first = llm.engine.add_request(FIRST, sp)
    until_prompt_done(llm, first)
    second = llm.engine.add_request(SECOND, sp)
    llm.engine.step()
    held = store.owned(second)
    llm.engine.abort(first)
    llm.check_integrity()
    assert store.owned(second) == held and store.num_shared == 0
    kv = llm.engine._seqs[second].recall
    assert kv is not None and kv.state is not None
    document = kv.state.value_slots[:SHARED]  # shadowkv: fitted, it holds no key any more
    assert all(store.index.block_of(s) is not None for s in document)  # still published
    for _ in range(3):
        llm.engine.step()
    held = store.owned(second)
    llm.engine.scheduler.preempt(llm.engine._seqs[second])
    assert store.owned(second) == held and llm.stats()["recall_sequences"] == 1
    llm.check_integrity()
    assert run_out(llm, second) == want
    assert_recall_idle(llm)


def test_salted_requests_do_not_share(recall_folder: Path) -> None:
    """A prefix published under one cache_salt (a tenant) is found under that salt only."""
    llm = recall_llm(recall_folder)
    tokens(llm, [FIRST], [params("quest", cache_salt="tenant:a")])
    for salt in ("tenant:b", None):
        out = llm.generate([SECOND], params("quest", cache_salt=salt))[0]
        assert out.num_cached_tokens == 0
    assert llm.stats()["recall_prefix_blocks_reused"] == 0
    out = llm.generate([SECOND], params("quest", cache_salt="tenant:a"))[0]
    assert out.num_cached_tokens == len(DOC)
    assert llm.stats()["recall_prefix_blocks_reused"] == SHARED
    assert_recall_idle(llm)


def test_a_full_store_evicts_cached_blocks_deepest_first(recall_folder: Path) -> None:
    """90 slots: the first request's 76 (31 of its blocks cached after it), then another
    prompt's 88: it is admitted at once, evicting 30 cached blocks, deepest first, so the
    document's first block stays and a later request still reuses it."""
    llm = recall_llm(recall_folder, kv_recall_host_memory=(90 * SLOT_BYTES + 1) / GIB)
    store = recall_of(llm).store
    assert store.num_slots == 90
    tokens(llm, [FIRST], [params("quest")])
    assert (store.num_cached, store.num_free) == (62, 28)
    other = [5 + (i * 13) % 400 for i in range(150)]
    sp = params("quest")
    assert tokens(llm, [other], [sp]) == [alone(recall_folder, other, sp)]
    stats = llm.stats()
    assert stats["recall_host_slots_evicted"] == 60
    assert stats["recall_prefix_blocks_indexed"] == 1 + len(other) // BLOCK
    out = llm.generate([SECOND], sp)[0]
    assert out.num_cached_tokens == BLOCK and out.token_ids == alone(recall_folder, SECOND, sp)
    assert_recall_idle(llm)


def test_a_store_too_small_still_names_both_numbers(recall_folder: Path) -> None:
    llm = recall_llm(recall_folder, kv_recall_host_memory=(40 * SLOT_BYTES + 1) / GIB)
    tokens(llm, [FIRST[:40]], [params("quest", max_tokens=8)])  # publishes 10 blocks
    with pytest.raises(InvalidRequestError, match=r"need 0\.15 MiB of host memory, but the "
                       r"recall store holds 0\.08 MiB"):  # fmt: skip
        llm.generate([SECOND], params("quest"))
    assert_recall_idle(llm)


def test_a_one_token_prefill_chunk_attends_every_block(recall_folder: Path) -> None:
    """129 prompt tokens in chunks of 64: the last chunk is one token, and it streams every
    middle block as any prefill chunk (it used to pick through the working set)."""
    llm = recall_llm(recall_folder, enable_prefix_caching=False)
    tokens(llm, [PROMPT[:129]], [params("quest", max_tokens=1)])
    stats = llm.stats()
    assert stats["recall_working_set_misses"] == stats["recall_working_set_hits"] == 0
    assert_recall_idle(llm)


def test_metrics_show_prefix_sharing(recall_folder: Path) -> None:
    llm = recall_llm(recall_folder)
    for prompt in (FIRST, SECOND):
        tokens(llm, [prompt], [params("quest")])
    text = ServerMetrics(llm.stats).render().decode()
    assert f"strata_recall_prefix_blocks_reused_total {float(SHARED)}" in text
    assert "strata_recall_prefix_blocks_indexed 33.0" in text
    assert f"strata_recall_host_bytes_cached {float(2 * 33 * SLOT_BYTES)}" in text


def test_embedded_model_shares_a_document() -> None:
    """SmolLM2-135M, quest picking 2 of its middle blocks: a question after a document
    another request sent first reuses the document and gives the tokens it gives alone
    (salted apart, so nothing is shared with it)."""
    llm = LLM(device="cpu", kv_cache_memory=0.5, kv_recall_host_memory=0.25,
              kv_recall_gpu_memory=0.25)  # fmt: skip
    encode = llm.engine.tokenizer.encode
    doc = encode("The history of Paris, in short: " * 16)
    doc = doc[: len(doc) // 16 * 16]
    first, second = doc + encode(" Who founded it?"), doc + encode(" What river crosses it?")
    greedy = {"temperature": 0.0, "max_tokens": 12, "ignore_eos": True}
    sp = SamplingParams(kv_policy="quest", kv_budget=32, **greedy)
    want = llm.generate([second], replace(sp, cache_salt="alone"))
    tokens(llm, [first], [sp])
    out = llm.generate([second], sp)[0]
    assert out.num_cached_tokens == len(doc) and out.token_ids == want[0].token_ids
    assert llm.stats()["recall_prefix_blocks_reused"] == len(doc) // 16
    assert_recall_idle(llm)


def test_tensor_parallelism_shares_no_prefix(tmp_path: Path) -> None:
    """Under TP=2 sharing is off (the workers mirror rank 0's admissions by serial, not
    by content): nothing is reused, and the tokens are TP=1's, which reuses the prefix."""
    folder = tmp_path / "llama-gqa"
    make_hf_model(TP_CONFIGS["llama-gqa"]()).save_pretrained(folder)
    options = {**RECALL_ENGINE, "kv_recall_host_memory": 0.01}
    sp = params("quest")
    ref = LLM(str(folder), **options)
    want = [tokens(ref, [p], [sp])[0] for p in (FIRST, SECOND)]
    assert ref.stats()["recall_prefix_blocks_reused"] == SHARED
    with LLM(str(folder), **options, tensor_parallel_size=2) as tp:
        recall = recall_of(tp)
        assert recall.sharing is None and recall.store.num_layers == 1  # the sparse layer
        assert [tokens(tp, [p], [sp])[0] for p in (FIRST, SECOND)] == want
        stats = tp.stats()
        assert stats["recall_prefix_blocks_reused"] == stats["recall_prefix_blocks_indexed"] == 0
        assert_recall_idle(tp)


def test_prompt_logprobs_compute_the_positions_they_score(recall_folder: Path) -> None:
    """A request asking for its prompt's logprobs reuses no position it has to score: it
    computes its whole prompt, and scores it as alone."""
    llm = recall_llm(recall_folder)
    scored = params("quest", prompt_logprobs=0, max_tokens=2)
    want = llm.generate([SECOND], replace(scored, cache_salt="alone"))[0]
    tokens(llm, [FIRST], [params("quest")])
    out = llm.generate([SECOND], scored)[0]
    assert out.num_cached_tokens == 0 and llm.stats()["recall_prefix_blocks_reused"] == 0
    assert out.token_ids == want.token_ids
    assert out.prompt_logprobs == want.prompt_logprobs
    assert_recall_idle(llm)
