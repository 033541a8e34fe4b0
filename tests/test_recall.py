"""The recall store (strata/kv/recall): quest and full_offload keep every block in host
memory and attend, per decode step, the blocks they pick.

Exact where it must be: Quest's scores equal their definition from min and max; the
working set holds exactly the picked blocks and fetches only the misses; at a budget
that covers every block both policies produce full attention's greedy tokens, also for
prompts longer than the whole GPU pool; a mixed batch equals solo runs; nothing leaks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from strata import LLM, SamplingParams
from strata.errors import InvalidRequestError
from strata.kv.recall.host_store import HostKVStore, HostStoreFullError
from strata.kv.recall.page_decode import PageDecoder
from strata.kv.recall.policy import SummaryRoom
from strata.kv.recall.quest import QuestPolicy
from strata.kv.recall.sequence import RecallSequence
from strata.kv.recall.working_set import WorkingSet
from tests.conftest import assert_no_leaks

BLOCK = 4
PROMPT = [3 + (i * 37) % 500 for i in range(150)]
GREEDY = {"temperature": 0.0, "ignore_eos": True, "max_tokens": 24}


def recall_llm(folder: Path, **kw: Any) -> LLM:
    options = {"num_kv_blocks": 200, "kv_recall_host_memory": 0.01,
               "kv_recall_gpu_memory": 0.05, "max_num_batched_tokens": 64, **kw}  # fmt: skip
    return LLM(str(folder), device="cpu", block_size=BLOCK, **options)


def tokens(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    return [out.token_ids for out in llm.generate(prompts, params)]


def prefilled(llm: LLM, params: SamplingParams) -> tuple[str, Any]:
    """Add PROMPT under params and step until its first token: (request id, engine
    sequence), its recall state in place."""
    engine = llm.engine
    request_id = engine.add_request(PROMPT, params)
    seq = engine._seqs[request_id]
    while seq.num_output_tokens == 0:
        engine.step()
    assert seq.recall is not None and seq.recall.state is not None
    return request_id, seq


def assert_recall_idle(llm: LLM) -> None:
    assert_no_leaks(llm)
    stats = llm.stats()
    assert stats["recall_sequences"] == 0
    assert stats["recall_host_bytes_used"] == 0 and stats["recall_gpu_bytes_used"] == 0
    assert stats["recall_host_table_bytes_used"] == 0


# ---- the parts ---------------------------------------------------------------------------


def test_host_store_hands_out_slots_first_free_and_takes_some_back() -> None:
    store = HostKVStore(6, 2, 1, BLOCK, 4, torch.float32, pin=False)
    assert store.data.shape == (2, 6, 1, BLOCK, 4)
    assert store.bytes_per_slot == 2 * BLOCK * 4 * 4  # one block's keys (or values)
    assert store.allocate("a", 4) == [0, 1, 2, 3] and store.allocate("b", 1) == [4]
    store.give_back("a", [2, 0])  # to the back of the free list, in that order
    assert store.owned("a") == [1, 3] and store.allocate("c", 3) == [5, 2, 0]
    with pytest.raises(RuntimeError, match="does not hold"):
        store.give_back("a", [4])
    with pytest.raises(HostStoreFullError, match="0 free slots of 6; 1 asked for"):
        store.allocate("d", 1)
    assert store.free("a") == 2 and store.check_integrity() == []
    assert store.num_free == 2 and store.used_bytes == 4 * store.bytes_per_slot


@pytest.mark.parametrize("page", [0, BLOCK, BLOCK // 2, 1])
def test_quest_scores_are_the_upper_bound_from_min_and_max(page: int) -> None:
    """page: quest_page_tokens (0 and BLOCK: one page per block, as Quest; smaller: a
    block's bound is its best page's)."""
    torch.manual_seed(0)
    kv_heads, group, dim, blocks = 2, 3, 8, 5
    quest = QuestPolicy()
    room = SummaryRoom(1, kv_heads, blocks + 2, dim, BLOCK, torch.float32, quest_page_tokens=page)
    quest.allocate(room)
    pages = BLOCK // (page or BLOCK)
    assert quest.kmin is not None and quest.kmin.shape[2] == (blocks + 2) * pages
    assert QuestPolicy.summary_bytes(room) == 2 * kv_heads * (blocks + 2) * pages * dim * 4
    keys = torch.randn(kv_heads, blocks, BLOCK, dim)
    quest.summarize(0, 0, keys[:, :2])
    quest.summarize(0, 2, keys[:, 2:])  # summaries arrive in pieces, as blocks retire
    q = torch.randn(kv_heads, group, dim)
    bound = torch.full((kv_heads, group, blocks), -torch.inf)
    for h in range(kv_heads):
        for b in range(blocks):
            for part in keys[h, b].chunk(pages):
                kmax, kmin = part.amax(0), part.amin(0)
                for g in range(group):
                    upper = torch.maximum(q[h, g] * kmax, q[h, g] * kmin).sum()
                    bound[h, g, b] = torch.maximum(bound[h, g, b], upper)
    for b in range(blocks):  # the bound is an upper bound of q.k over the block's keys
        assert (bound[:, :, b, None] >= q @ keys[:, b].transpose(1, 2) - 1e-5).all()
    # the group's query heads: each one's softmax over the blocks, the largest share wins
    expected = torch.softmax(bound / dim**0.5, dim=-1).amax(dim=1)
    torch.testing.assert_close(quest.scores(0, q, blocks), expected)


def test_quest_scores_past_the_live_count_are_minus_infinity() -> None:
    """The fixed-shape form CUDA graphs replay: scores over every block the room holds,
    those at or past the device count `live` at -inf, the others as over `live` blocks."""
    torch.manual_seed(0)
    quest = QuestPolicy()
    quest.allocate(SummaryRoom(1, 2, 8, 8, BLOCK, torch.float32, quest_page_tokens=2))
    quest.summarize(0, 0, torch.randn(2, 5, BLOCK, 8))
    q = torch.randn(2, 3, 8)
    scores = quest.scores(0, q, 8, live=torch.tensor(5))
    torch.testing.assert_close(scores[:, :5], quest.scores(0, q, 5))
    assert torch.isneginf(scores[:, 5:]).all()


def test_working_set_keeps_hits_and_moves_only_misses() -> None:
    kv_heads, slots = 2, 3
    ws = WorkingSet(1, kv_heads, slots, BLOCK, 2, torch.float32, torch.device("cpu"))
    held, moves = ws.update(0, torch.tensor([[4, 1, -1], [0, 2, 3]]))
    assert held.tolist() == [[True, True, False], [True, True, True]]
    assert ws.tag[0].tolist() == [[4, 1, -1], [0, 2, 3]]
    assert moves.mask.tolist() == [[True, True, False], [True, True, True]]
    assert moves.blocks[moves.mask].tolist() == [4, 1, 0, 2, 3]
    assert (int(ws.hits), int(ws.misses)) == (0, 5)
    _, moves = ws.update(0, torch.tensor([[1, 7, 4], [3, 5, 6]]))
    # head 0 keeps 4 and 1 in place, 7 takes the empty slot; head 1 keeps 3 only
    assert ws.tag[0].tolist() == [[4, 1, 7], [5, 6, 3]]
    assert (int(ws.hits), int(ws.misses)) == (3, 8)
    moved = [
        (h, int(moves.slots[h, i]), int(moves.blocks[h, i]))
        for h in range(kv_heads) for i in range(slots) if moves.mask[h, i]
    ]  # fmt: skip
    assert sorted(moved) == [(0, 2, 7), (1, 0, 5), (1, 1, 6)]
    assert moves.destination_rows(slots).view(kv_heads, slots)[moves.mask].tolist() == [2, 3, 4]


def test_a_larger_working_set_keeps_earlier_picks_least_recent_out_first() -> None:
    """Four slots for two picks a step: blocks picked earlier stay (a later pick of them
    is a hit), a miss takes an empty slot, then the least recently picked; only the
    step's picks are attended."""
    ws = WorkingSet(1, 1, 4, BLOCK, 2, torch.float32, torch.device("cpu"))

    def step(picks: list[int]) -> tuple[list[bool], list[tuple[int, int]]]:
        attended, moves = ws.update(0, torch.tensor([picks]))
        moved = [(int(s), int(b)) for s, b, m in
                 zip(moves.slots[0], moves.blocks[0], moves.mask[0], strict=True) if m]  # fmt: skip
        return attended[0].tolist(), moved

    assert step([10, 11]) == ([True, True, False, False], [(0, 10), (1, 11)])
    assert step([12, 13]) == ([False, False, True, True], [(2, 12), (3, 13)])
    assert step([11, 14]) == ([True, True, False, False], [(0, 14)])  # 11 a hit
    assert ws.tag[0, 0].tolist() == [14, 11, 12, 13]  # 10, picked longest ago, went
    assert ws.age[0, 0].tolist() == [0, 0, 1, 1]
    attended, moved = step([13, 10])  # 13 a hit; 10 back into 12's slot (older than 14)
    assert moved == [(2, 10)] and attended == [False, False, True, True]
    assert ws.tag[0, 0].tolist() == [14, 11, 10, 13]
    assert (int(ws.hits), int(ws.misses)) == (2, 6)


# ---- the engine ------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["quest", "full_offload"])
def test_full_budget_equals_full_attention(recall_folder: Path, policy: str) -> None:
    llm = recall_llm(recall_folder)
    full = tokens(llm, [PROMPT], [SamplingParams(**GREEDY)])
    recall = tokens(llm, [PROMPT], [SamplingParams(kv_policy=policy, kv_budget=10**6, **GREEDY)])
    assert recall == full
    stats = llm.stats()
    assert stats["recall_decode_steps"] == GREEDY["max_tokens"] - 1
    assert stats["recall_bytes_fetched"] > 0
    assert_recall_idle(llm)


def test_quest_pages_reach_the_policy_and_its_memory(recall_folder: Path) -> None:
    """kv_recall_quest_page_tokens 2 with blocks of 4: two min/max pages per block, so a
    quest sequence's summaries take twice the GPU memory; the run leaks nothing."""
    paged = recall_llm(recall_folder, kv_recall_quest_page_tokens=2)
    whole = recall_llm(recall_folder)
    managers = [llm.engine.parts.recall for llm in (paged, whole)]
    assert managers[0] is not None and managers[1] is not None
    assert managers[0].geometry.quest_page_tokens == 2
    paged_kv, whole_kv = (m.kv_for("quest", 10, 200, 50, 150) for m in managers)
    g = managers[1].geometry
    room = g.room_blocks(50)  # 52: rounded to a step of 4
    quest_summaries = 2 * g.sparse_layers * g.num_kv_heads * room * g.head_dim * g.dtype.itemsize
    assert paged_kv.gpu_bytes - whole_kv.gpu_bytes == quest_summaries
    out = tokens(paged, [PROMPT], [SamplingParams(kv_policy="quest", kv_budget=40, **GREEDY)])
    assert len(out[0]) == GREEDY["max_tokens"]
    assert paged.stats()["recall_blocks_attended_per_step"] == 10
    assert_recall_idle(paged)
    with pytest.raises(ValueError, match="kv_recall_quest_page_tokens"):
        recall_llm(recall_folder, kv_recall_quest_page_tokens=3)


def test_prompt_longer_than_the_pool_prefills_exactly(recall_folder: Path) -> None:
    """The pool holds 20 tokens; the prompt is 150, in chunks of 64, with 4 dense layers
    of 4 turned sparse (dense_layers 0), every middle block streamed from the host."""
    reference = tokens(recall_llm(recall_folder), [PROMPT], [SamplingParams(**GREEDY)])
    llm = recall_llm(
        recall_folder, num_kv_blocks=5, kv_policy="quest", kv_budget=10**6,
        kv_recall_dense_layers=0,
    )  # fmt: skip
    assert tokens(llm, [PROMPT], [SamplingParams(**GREEDY)]) == reference
    assert_recall_idle(llm)


@pytest.mark.parametrize("policy", ["quest", "shadowkv"])
def test_a_larger_working_set_attends_the_same_picks_and_fetches_less(
    recall_folder: Path, policy: str
) -> None:
    """kv_recall_working_set_factor 3: each step attends the same picks (the same
    tokens), more of them are hits and fewer bytes cross from the host; at full budget
    it still equals full attention."""
    params = [SamplingParams(kv_policy=policy, kv_budget=40, **GREEDY)] * 2
    runs = {}
    for factor in (1, 3):
        llm = recall_llm(recall_folder, kv_recall_working_set_factor=factor)
        runs[factor] = (tokens(llm, [PROMPT, PROMPT[20:]], params), llm.stats())
        assert_recall_idle(llm)
    assert runs[3][0] == runs[1][0]
    one, three = runs[1][1], runs[3][1]
    assert three["recall_working_set_hit_rate"] > one["recall_working_set_hit_rate"]
    assert three["recall_bytes_fetched"] < one["recall_bytes_fetched"]
    assert three["recall_blocks_attended_per_step"] == one["recall_blocks_attended_per_step"]
    llm = recall_llm(recall_folder, kv_recall_working_set_factor=3)
    full = tokens(llm, [PROMPT], [SamplingParams(**GREEDY)])
    exact = SamplingParams(kv_policy=policy, kv_budget=10**6, **GREEDY)
    assert tokens(llm, [PROMPT], [exact]) == full


def test_working_set_factor_must_be_positive(recall_folder: Path) -> None:
    with pytest.raises(ValueError, match="kv_recall_working_set_factor must be >= 1, got 0"):
        recall_llm(recall_folder, kv_recall_working_set_factor=0)


def test_mixed_batch_equals_solo_runs(recall_folder: Path) -> None:
    llm = recall_llm(recall_folder)
    prompts = [PROMPT, PROMPT[:90], PROMPT[30:], PROMPT[:70], PROMPT[10:], PROMPT[5:],
               PROMPT[15:], PROMPT[20:]]  # fmt: skip
    params = [
        SamplingParams(kv_policy="quest", kv_budget=40, **GREEDY),
        SamplingParams(**GREEDY),
        SamplingParams(kv_policy="full_offload", kv_budget=1, **GREEDY),
        SamplingParams(kv_policy="snapkv", kv_budget=0.5, **GREEDY),
        SamplingParams(kv_policy="shadowkv", kv_budget=40, **GREEDY),
        SamplingParams(kv_policy="clusterkv", kv_budget=40, **GREEDY),
        SamplingParams(kv_policy="pqcache", kv_budget=40, **GREEDY),
        SamplingParams(kv_policy="magicpig", kv_budget=40, **GREEDY),
    ]
    solo = [tokens(llm, [p], [sp])[0] for p, sp in zip(prompts, params, strict=True)]
    assert tokens(llm, prompts, params) == solo
    assert_recall_idle(llm)


def test_small_budget_attends_the_budget(recall_folder: Path) -> None:
    """Budget 40 tokens with blocks of 4: 10 middle blocks per layer and head each decode
    step (the sink, the window and the open block besides them)."""
    llm = recall_llm(recall_folder)
    tokens(llm, [PROMPT], [SamplingParams(kv_policy="quest", kv_budget=40, **GREEDY)])
    stats = llm.stats()
    assert stats["recall_blocks_attended_per_step"] == 10
    assert 0 < stats["recall_working_set_hit_rate"] <= 1


@pytest.mark.parametrize("policy", ["quest", "shadowkv", "pqcache"])
def test_fixed_shape_decode_equals_the_growing_one(
    recall_folder: Path, policy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Selecting decode steps run through the sequence's page, the fixed-shape path CUDA
    graphs capture (every row of the page behind an active mask, the tail at full
    capacity behind a mask, scores over the whole room past a device count, blocks
    retiring after attention); it gives the tokens of the path that gathers exactly
    what it attends."""
    params = SamplingParams(kv_policy=policy, kv_budget=40, **GREEDY)
    steps = assert_fixed_equals_growing(recall_folder, [PROMPT, PROMPT[20:]], params, monkeypatch)
    # every sparse layer (4 of 4 minus 2 dense) of every step but the first, which fits
    # the policy's summaries or (quest) follows the prompt's last chunk
    assert steps >= 2 * (GREEDY["max_tokens"] - 2)


def assert_fixed_equals_growing(
    folder: Path, prompts: list[list[int]], params: SamplingParams,
    monkeypatch: pytest.MonkeyPatch,
) -> int:  # fmt: skip
    """Decode `prompts` through pages, then growing per sequence (static_decode off):
    equal tokens, blocks attended and bytes fetched, nothing left held. Returns the
    page decodes (sparse layers) of the first run."""
    static_steps = 0
    decode_page = PageDecoder.decode

    def counted(self: PageDecoder, *args: Any) -> torch.Tensor:
        nonlocal static_steps
        static_steps += 1
        return decode_page(self, *args)

    monkeypatch.setattr(PageDecoder, "decode", counted)
    llm = recall_llm(folder)
    fixed = tokens(llm, prompts, [params] * len(prompts))
    fixed_stats = llm.stats()
    monkeypatch.setattr(RecallSequence, "static_decode", False)
    growing = recall_llm(folder)
    assert tokens(growing, prompts, [params] * len(prompts)) == fixed
    stats = growing.stats()
    for name in ("recall_blocks_attended_per_step", "recall_bytes_fetched"):
        assert stats[name] == fixed_stats[name], name
    assert_recall_idle(llm)
    assert_recall_idle(growing)
    return static_steps


def test_abort_frees_host_slots_and_preemption_keeps_the_store(recall_folder: Path) -> None:
    """A preempted recall sequence holds no pool block; its store state stays and it
    resumes where it was (recomputing it would change its sparse decode's KV)."""
    llm = recall_llm(recall_folder)
    engine = llm.engine
    params = SamplingParams(kv_policy="quest", kv_budget=40, **GREEDY)
    first = engine.add_request(PROMPT, params)
    engine.step()
    kv, store = engine._seqs[first].recall, engine.parts.recall.store  # type: ignore[union-attr]
    assert kv is not None and kv.state is not None
    # a key slot and a value slot per block, first-free, kept while quest runs
    assert kv.state.key_slots == list(range(kv.host_blocks))
    assert kv.state.value_slots == list(range(kv.host_blocks, 2 * kv.host_blocks))
    assert llm.stats()["recall_host_bytes_used"] == 2 * kv.host_blocks * store.bytes_per_slot
    engine.abort(first)
    assert llm.stats()["recall_host_bytes_used"] == 0
    solo = tokens(llm, [PROMPT], [params])[0]
    second = engine.add_request(PROMPT, params)
    for _ in range(5):
        engine.step()
    held = llm.stats()["recall_host_bytes_used"]
    engine.scheduler.preempt(engine._seqs[second])
    assert llm.stats()["recall_host_bytes_used"] == held > 0
    llm.check_integrity()
    out = []
    while engine.has_unfinished():
        out = [o for o in engine.step() if o.request_id == second] or out
    assert out[0].token_ids == solo
    assert_recall_idle(llm)


def test_a_model_whose_layers_are_all_dense(tiny_models: dict[str, Any]) -> None:
    """Two layers, both dense by default: nothing goes to the host, outputs are exact."""
    folder, _ = tiny_models["llama"]
    llm = recall_llm(folder, kv_recall_host_memory=1e-6)  # one slot: none is needed
    prompt = PROMPT[:100]
    full = tokens(llm, [prompt], [SamplingParams(**GREEDY)])
    quest = tokens(llm, [prompt], [SamplingParams(kv_policy="quest", kv_budget=16, **GREEDY)])
    assert quest == full
    assert llm.stats()["recall_bytes_fetched"] == 0
    assert_recall_idle(llm)


def test_bad_input_gets_a_clear_error(recall_folder: Path) -> None:
    small = recall_llm(recall_folder, kv_recall_host_memory=2e-5)  # 20 KiB: 80 tokens
    with pytest.raises(InvalidRequestError, match="host memory"):
        small.generate([PROMPT], SamplingParams(kv_policy="quest", kv_budget=64, max_tokens=8))
    llm = recall_llm(recall_folder)
    for budget in (0, -5):
        with pytest.raises(ValueError, match="kv_budget"):
            SamplingParams(kv_policy="quest", kv_budget=budget)
    with pytest.raises(ValueError, match="unknown kv_policy"):
        SamplingParams(kv_policy="quests", kv_budget=64)
    plain = LLM(str(recall_folder), device="cpu", num_kv_blocks=200, block_size=BLOCK)
    with pytest.raises(InvalidRequestError, match="recall store"):
        plain.generate([PROMPT], SamplingParams(kv_policy="quest", kv_budget=64))
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        recall_llm(recall_folder, kv_cache_dtype="int8")
    assert_recall_idle(llm)


def test_embedded_model_at_full_budget(embedded_llm: LLM) -> None:
    llm = LLM(device="cpu", kv_cache_memory=0.5, kv_recall_host_memory=0.25,
              kv_recall_gpu_memory=0.25)  # fmt: skip
    prompt = llm.engine.tokenizer.encode("The history of Paris, in short: " * 12)
    greedy = {"temperature": 0.0, "max_tokens": 12, "ignore_eos": True}
    full = tokens(embedded_llm, [prompt], [SamplingParams(**greedy)])
    quest = tokens(llm, [prompt], [SamplingParams(kv_policy="quest", kv_budget=10**6, **greedy)])
    assert quest == full
    assert_recall_idle(llm)
