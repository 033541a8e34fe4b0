"""magicpig (strata/kv/recall/magicpig.py, lsh.py, sampled_attention.py): SimHash codes,
collisions, importance weights and the log-sum-exp merge, each against a direct
computation; the engine exact within the budget, sampling past it, on the host or the
device as the cost model says, and leaking nothing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from strata import SamplingParams
from strata.errors import InvalidRequestError
from strata.kv.recall import magicpig, sampled_attention
from strata.kv.recall.host_attention_cost import HostAttentionCost, host_attention_cost
from strata.kv.recall.lsh import (
    MIN_COLLISIONS,
    HashTables,
    hash_codes,
    projection,
    sampling_probability,
)
from strata.kv.recall.magicpig import MagicPIGPolicy
from strata.kv.recall.policy import SummaryRoom
from strata.kv.recall.sampled_attention import attention_lse, merge, sampled_part
from tests.test_recall import GREEDY, PROMPT, assert_recall_idle, recall_llm, tokens


def test_codes_are_the_signs_of_the_projections() -> None:
    torch.manual_seed(0)
    bits, tables, dim = 3, 5, 8
    proj = projection(dim, bits, tables, None, seed=1)
    assert torch.equal(proj, projection(dim, bits, tables, None, seed=1))  # seeded
    x = torch.randn(2, 7, dim)
    codes = hash_codes(x, proj, bits)
    assert codes.shape == (2, 7, tables) and codes.dtype == torch.int16
    for i in range(2):
        for t in range(7):
            for table in range(tables):
                want = sum(1 << j for j in range(bits)
                           if float(x[i, t] @ proj[:, table * bits + j]) > 0)  # fmt: skip
                assert int(codes[i, t, table]) == want


@pytest.mark.parametrize(("n", "bits"), [(60, 3), (30, 8)])  # full buckets, mostly empty
def test_candidates_are_the_tokens_colliding_in_two_tables(n: int, bits: int) -> None:
    """Sorted tables, appended codes and re-sorted tables all give the tokens sharing the
    query's code in at least MIN_COLLISIONS tables, per query head, by its KV head."""
    torch.manual_seed(0)
    kv_heads, tables, heads = 2, 6, 4
    codes = torch.randint(0, 1 << bits, (kv_heads, n, tables), dtype=torch.int16)
    q = torch.randint(0, 1 << bits, (heads, tables), dtype=torch.int16)
    same = (codes[torch.arange(heads) // 2] == q[:, None, :]).sum(-1)  # [heads, n]
    direct = (same >= MIN_COLLISIONS).nonzero()
    built = HashTables(codes[:, :40], bits)
    built.append(codes[:, 40:])
    for found in (built.candidates(q, 2), built.resorted().candidates(q, 2)):
        assert torch.equal(torch.stack([found.heads, found.tokens], 1), direct)
    assert built.resorted().tail.shape[1] == 0 and built.num_tokens == n
    unseen = sorted(set(range(1 << bits)) - set(codes.flatten().tolist()))
    assert bool(unseen) == (bits == 8)  # 8 bits: codes no token has, in no bucket
    for code in unseen[:1]:
        nothing = built.resorted().candidates(torch.full_like(q, code), 2)
        assert nothing.heads.numel() == 0 and nothing.tokens.numel() == 0


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_candidates_of_head_runs_on_threads_equal_one_call(
    monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """Query heads split into runs of whole KV heads (first_head), found on worker
    threads and concatenated, give exactly the candidates of one call."""
    torch.manual_seed(1)
    kv_heads, n, tables, bits, group = 5, 90, 8, 2, 3
    codes = torch.randint(0, 1 << bits, (kv_heads, n, tables), dtype=torch.int16)
    q = torch.randint(0, 1 << bits, (kv_heads * group, tables), dtype=torch.int16)
    built = HashTables(codes[:, :70], bits)
    built.append(codes[:, 70:])
    whole = built.candidates(q, group)
    part = built.candidates(q[6:12], group, first_head=6)
    inside = (whole.heads >= 6) & (whole.heads < 12)
    assert torch.equal(part.heads, whole.heads[inside])
    assert torch.equal(part.tokens, whole.tokens[inside])
    monkeypatch.setattr(sampled_attention, "CANDIDATE_WORKERS", workers)
    found = sampled_attention._candidates(built, q, group)
    assert torch.equal(found.heads, whole.heads) and torch.equal(found.tokens, whole.tokens)


def test_sampling_probability_is_two_or_more_collisions() -> None:
    """w = P(at least 2 of L tables collide), each with probability (1 - angle/pi)^K."""
    bits, tables = 4, 7
    cos = torch.tensor([1.0, 0.5, 0.0, -0.3])
    got = sampling_probability(cos, bits, tables)
    for c, w in zip(cos.tolist(), got.tolist(), strict=True):
        p = (1 - math.acos(c) / math.pi) ** bits
        want = 1 - sum(math.comb(tables, j) * p**j * (1 - p) ** (tables - j) for j in range(2))
        assert w == pytest.approx(max(want, 1e-38), rel=1e-5)


def test_sampled_part_weights_each_key_by_its_sampling_probability() -> None:
    torch.manual_seed(0)
    heads, group, dim, bits, tables, scale = 4, 2, 8, 3, 6, 0.3
    q = torch.randn(heads, dim)
    mean = torch.randn(heads // group, dim)
    sample_heads = torch.tensor([0, 0, 0, 2, 2, 3])  # head 1 samples nothing
    keys, values = torch.randn(6, dim), torch.randn(6, dim)
    out, lse = sampled_part(q, sample_heads, keys, values, mean, group, scale, bits, tables)
    for h in range(heads):
        mine = (sample_heads == h).nonzero().flatten()
        if len(mine) == 0:
            assert lse[h] == float("-inf") and torch.all(out[h] == 0)
            continue
        centred = keys[mine] - mean[h // group]
        cos = centred @ q[h] / (centred.norm(dim=-1) * q[h].norm())
        weight = torch.exp(keys[mine] @ q[h] * scale) / sampling_probability(cos, bits, tables)
        assert lse[h] == pytest.approx(float(weight.sum().log()), rel=1e-5)
        assert torch.allclose(out[h], (weight[:, None] * values[mine]).sum(0) / weight.sum(),
                              atol=1e-5)  # fmt: skip


def test_merged_parts_equal_attention_over_both() -> None:
    torch.manual_seed(0)
    q = torch.randn(4, 8)
    keys, values = torch.randn(2, 11, 8), torch.randn(2, 11, 8)
    whole, _ = attention_lse(q, keys, values, 0.4)
    out_a, lse_a = attention_lse(q, keys[:, :5], values[:, :5], 0.4)
    out_b, lse_b = attention_lse(q, keys[:, 5:], values[:, 5:], 0.4)
    assert torch.allclose(merge(out_a, lse_a, out_b, lse_b), whole, atol=1e-6)
    empty = torch.full((4,), float("-inf"))  # a part with no key leaves the other
    assert torch.allclose(merge(out_a, lse_a, torch.zeros(4, 8), empty), out_a)


def test_tables_gather_retired_blocks_and_sort_them_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """After the fit, retired blocks are hashed centred on the fitted mean and appended;
    past RESORT_TOKENS a worker sorts them in; candidates cover every token throughout."""
    monkeypatch.setattr(magicpig, "RESORT_TOKENS", 8)
    torch.manual_seed(0)
    policy = MagicPIGPolicy()
    policy.allocate(SummaryRoom(1, 2, 16, 8, 4, torch.float32, 2))
    keys = torch.randn(2, 6, 4, 8)  # 6 blocks of 4
    assert policy.wants_all_keys(0)
    policy.take_all_keys(0, keys[:, :3])
    assert not policy.wants_all_keys(0)
    assert torch.allclose(policy.mean[0], keys[:, :3].reshape(2, 12, 8).mean(1))
    policy.summarize_layers(slice(0, 1), 2, keys[None, :, 2:4])  # block 2 again: skipped
    policy.summarize(0, 4, keys[:, 4:])
    future = policy.resorting[0]  # 12 unsorted codes: a worker sorts them in
    assert future is not None
    assert future.result().num_tokens == 24
    tables = policy.tables_of(0)  # the sorted tables, taken at the next use
    assert policy.resorting[0] is None and tables.tail.shape[1] == 0
    assert tables.num_tokens == 24
    centred = keys.reshape(2, 24, 8) - policy.mean[0][:, None]
    assert torch.equal(tables.codes, hash_codes(centred, policy.proj, policy.bits))
    q = hash_codes(torch.randn(4, 8), policy.proj, policy.bits)
    found = tables.candidates(q, 2)
    same = (tables.codes[torch.arange(4) // 2] == q[:, None, :]).sum(-1)
    assert torch.equal(torch.stack([found.heads, found.tokens], 1), (same >= 2).nonzero())


def test_cost_model_attends_on_the_host_unless_copying_is_cheaper() -> None:
    assert host_attention_cost(torch.device("cpu")).h2d_bytes_per_s is None
    assert HostAttentionCost(1e-6, None).on_host(256)
    fast_link = HostAttentionCost(1e-6, 1e12)  # 512 bytes cross in 0.5 ns: the device wins
    slow_link = HostAttentionCost(1e-9, 1e9)  # 512 bytes cross in 512 ns: the host wins
    assert not fast_link.on_host(256) and slow_link.on_host(256)
    assert "M sampled keys/s" in HostAttentionCost(1e-7, 2e10).describe()


# ---- the engine ------------------------------------------------------------------------------


def test_within_the_budget_is_exact_past_it_samples(recall_folder: Path) -> None:
    llm = recall_llm(recall_folder)
    full = tokens(llm, [PROMPT], [SamplingParams(**GREEDY)])
    exact = SamplingParams(kv_policy="magicpig", kv_budget=10**6, **GREEDY)
    assert tokens(llm, [PROMPT], [exact]) == full
    assert llm.stats()["recall_keys_sampled_per_layer_head"] == 0
    sampled = SamplingParams(kv_policy="magicpig", kv_budget=40, **GREEDY)
    out = tokens(llm, [PROMPT], [sampled])
    assert len(out[0]) == GREEDY["max_tokens"]
    stats = llm.stats()
    assert stats["recall_keys_sampled_per_layer_head"] > 0
    assert stats["recall_sampled_on_host_share"] == 1.0  # the CPU is the device: host
    assert stats["recall_sampled_host_ms_per_layer"] > 0
    assert stats["recall_sampled_wait_ms_per_layer"] > 0
    assert_recall_idle(llm)


def test_device_attention_of_the_samples_equals_the_hosts(
    recall_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = [SamplingParams(kv_policy="magicpig", kv_budget=40, **GREEDY)]
    on_host = tokens(recall_llm(recall_folder), [PROMPT], params)
    monkeypatch.setattr(sampled_attention, "host_attention_cost",
                        lambda device: HostAttentionCost(1.0, 1e12))  # fmt: skip
    llm = recall_llm(recall_folder)
    assert tokens(llm, [PROMPT], params) == on_host
    assert llm.stats()["recall_sampled_on_host_share"] == 0.0
    assert_recall_idle(llm)


def test_magicpig_past_the_budget_does_not_depend_on_it(recall_folder: Path) -> None:
    """The budget only says where sampling starts: every budget the prompt's middle
    outgrows gives the same tokens (so one RULER run stands for all such budgets)."""
    runs = []
    for budget in (40, 20):
        llm = recall_llm(recall_folder)
        params = [SamplingParams(kv_policy="magicpig", kv_budget=budget, **GREEDY)]
        runs.append(tokens(llm, [PROMPT], params)[0])
        assert llm.stats()["recall_keys_sampled_per_layer_head"] > 0  # it sampled
    full = tokens(recall_llm(recall_folder), [PROMPT], [SamplingParams(**GREEDY)])[0]
    assert runs[0] == runs[1] != full


def test_magicpig_in_a_mixed_batch_equals_solo_runs(recall_folder: Path) -> None:
    llm = recall_llm(recall_folder)
    prompts = [PROMPT, PROMPT[30:], PROMPT[:90]]
    params = [
        SamplingParams(kv_policy="magicpig", kv_budget=40, **GREEDY),
        SamplingParams(kv_policy="quest", kv_budget=40, **GREEDY),
        SamplingParams(**GREEDY),
    ]
    solo = [tokens(llm, [p], [sp])[0] for p, sp in zip(prompts, params, strict=True)]
    assert tokens(llm, prompts, params) == solo
    assert_recall_idle(llm)


def test_sequences_sampling_together_start_their_host_parts_first(
    recall_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three magicpig sequences decoding together: a layer's host parts start before any
    of them decodes it, each decode uses its own (one host part per sampled decode), and
    the tokens equal solo runs'."""
    from strata.kv.recall import attention, sequence

    llm = recall_llm(recall_folder)
    prompts = [PROMPT, PROMPT[30:], PROMPT[:90]]
    params = [SamplingParams(kv_policy="magicpig", kv_budget=40, **GREEDY)] * 3
    solo = [tokens(llm, [p], [sp])[0] for p, sp in zip(prompts, params, strict=True)]
    calls = {"ahead": 0, "submitted": 0, "decoded": 0}
    start_host_part, submit = sampled_attention.start_host_part, sampled_attention._submit
    sampled_decode = sequence.sampled_decode

    def count(name, fn, returns_ok=False):  # type: ignore[no-untyped-def]
        def counted(*args):  # type: ignore[no-untyped-def]
            out = fn(*args)
            calls[name] += bool(out) if returns_ok else 1
            return out

        return counted

    monkeypatch.setattr(attention, "start_host_part", count("ahead", start_host_part, True))
    monkeypatch.setattr(sampled_attention, "_submit", count("submitted", submit))
    monkeypatch.setattr(sequence, "sampled_decode", count("decoded", sampled_decode))
    assert tokens(llm, prompts, params) == solo
    assert 0 < calls["ahead"] <= calls["decoded"] == calls["submitted"]
    assert_recall_idle(llm)


def tables_bytes(folder: Path) -> int:
    """Host bytes magicpig's tables reserve for PROMPT + max_tokens on the test engine."""
    manager = recall_llm(folder).engine.parts.recall
    assert manager is not None
    return manager.plan_for("magicpig", 40, len(PROMPT), GREEDY["max_tokens"]).table_bytes


def test_tables_are_reserved_and_bounded_by_the_store_size(recall_folder: Path) -> None:
    """magicpig's tables (outside the store) reserve host bytes at admission, at most the
    store's size in all: with room for one sequence's tables, a second waits for the
    first to finish, and both give their tokens alone; a request whose tables could never
    fit gets an error that says so."""
    need = tables_bytes(recall_folder)
    llm = recall_llm(recall_folder, kv_recall_host_memory=1.5 * need / 2**30)
    manager = llm.engine.parts.recall
    assert manager is not None and manager.table_budget < 2 * need
    params = SamplingParams(kv_policy="magicpig", kv_budget=40, **GREEDY)
    alone = tokens(llm, [PROMPT], [params])[0]
    engine = llm.engine
    ids = [engine.add_request(PROMPT, params) for _ in range(2)]
    seqs = [engine._seqs[i] for i in ids]
    while engine.has_unfinished():
        engine.step()
        assert len(manager.live) <= 1 and manager.table_used <= manager.table_budget
        assert llm.stats()["recall_host_table_bytes_used"] in (0, need)
    assert [list(s.output_token_ids) for s in seqs] == [alone, alone]
    assert_recall_idle(llm)
    small = recall_llm(recall_folder, kv_recall_host_memory=0.6 * need / 2**30)
    with pytest.raises(InvalidRequestError, match="tables beside the store"):
        small.generate([PROMPT], params)

