"""The replica simulator (strata/sim): determinism, exact step costs, routing with the real
routers, LRU block accounting, BurstGPT-shaped arrivals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from strata.sim.block_cache import BlockCache
from strata.sim.cluster import SimResult, Simulator
from strata.sim.config import SimConfig
from strata.sim.costs import FEATURES, StepCost, StepSample, StepWork, chunk_pairs, fit_step_cost
from strata.sim.request import SimRequest, segment_keys
from strata.sim.workloads import BurstGPTShape, ChatWorkload

COST = StepCost(0.02, 0.001, 0.003, per_prefill_pair_s=1e-6, per_decode_pair_s=3e-6)
BS = 16


def request(i: int, arrival: float, system: int, prompt: int = 100, output: int = 5) -> SimRequest:
    segments = [(system, 64), (1000 + i, prompt - 64), (2000 + i, output)]
    return SimRequest(i, arrival, prompt, output, segment_keys(segments, BS))


def ttfts(result: SimResult) -> list[float]:
    return [s.ttft_s for s in result.seqs]


def test_same_seed_same_run_other_seed_other_run() -> None:
    workload = ChatWorkload(sessions=60, rate=8.0, turns=3, think_s=1.0)
    config = SimConfig(replicas=4, router="kv-aware", blocks_per_replica=256)
    runs = [Simulator(config, COST).run(workload.requests(seed, BS)) for seed in (1, 1, 2)]
    assert ttfts(runs[0]) == ttfts(runs[1])
    assert [s.replica for s in runs[0].seqs] == [s.replica for s in runs[1].seqs]
    assert ttfts(runs[0]) != ttfts(runs[2])


def test_one_request_takes_the_fitted_prefill_and_decode_time() -> None:
    prompt, output = 100, 5
    result = Simulator(SimConfig(replicas=1), COST).run([request(0, 0.0, 1, prompt, output)])
    seq = result.seqs[0]
    prefill = COST.seconds(StepWork(prompt, 1, chunk_pairs(0, prompt), 0))
    contexts = range(prompt, prompt + output - 1)
    decode = sum(COST.seconds(StepWork(1, 1, 0, chunk_pairs(c, c + 1))) for c in contexts)
    assert seq.first_token_s == prefill
    assert seq.finished_s == pytest.approx(prefill + decode, rel=1e-12)
    assert chunk_pairs(prompt, prompt + 1) == prompt + 1  # a decode attends the whole context


def test_request_overhead_and_transfer_add_their_time() -> None:
    config = SimConfig(replicas=2, prefill_replicas=1, request_overhead_s=0.5,
                       transfer_base_s=0.1, transfer_s_per_block=0.01)  # fmt: skip
    seq = Simulator(config, COST).run([request(0, 0.0, 1, 100, 3)]).seqs[0]
    prefill = COST.seconds(StepWork(100, 1, chunk_pairs(0, 100), 0))
    assert seq.first_token_s == pytest.approx(0.5 + prefill)
    decode = sum(COST.seconds(StepWork(1, 1, 0, chunk_pairs(c, c + 1))) for c in (100, 101))
    assert seq.finished_s == pytest.approx(0.5 + prefill + 0.1 + 7 * 0.01 + decode)


def test_closed_loop_and_chat_turns_wait_for_the_answer_before() -> None:
    closed = Simulator(SimConfig(replicas=2, concurrency=1), COST)
    seqs = closed.run([request(i, 0.0, 1) for i in range(3)]).seqs
    assert [s.sent_s for s in seqs[1:]] == [s.finished_s for s in seqs[:2]]
    turns = [request(0, 0.0, 1), SimRequest(1, 2.5, 120, 5, (), follows=0)]
    first, second = Simulator(SimConfig(replicas=2), COST).run(turns).seqs
    assert first.finished_s is not None and second.sent_s == first.finished_s + 2.5


def test_kv_aware_sends_a_repeated_prefix_to_the_replica_holding_it() -> None:
    # Four different system prompts spread over four replicas, then each again, later.
    first = [request(i, 0.0, 10 + i) for i in range(4)]
    again = [request(4 + i, 30.0 + i, 10 + i) for i in range(4)]
    sim = Simulator(SimConfig(replicas=4, router="kv-aware"), COST)
    result = sim.run(first + again)
    placed = [s.replica for s in result.seqs]
    assert sorted(placed[:4]) == [0, 1, 2, 3]
    assert placed[4:] == placed[:4]
    assert result.decisions == {"load": 4, "prefix": 4}
    assert all(s.cached_tokens == 64 for s in result.seqs[4:])  # the 4 system blocks
    rr = Simulator(SimConfig(replicas=4, router="round-robin"), COST).run(first[:1] + again[:1])
    assert [s.replica for s in rr.seqs] == [0, 1] and rr.seqs[1].cached_tokens == 0


def test_blocks_are_all_returned_and_lru_evicts_tails_first() -> None:
    workload = ChatWorkload(
        sessions=80,
        rate=20.0,
        turns=2,
        think_s=0.5,
        system_len=64,
        shape=BurstGPTShape(max_len=256),
    )
    config = SimConfig(replicas=3, router="least-loaded", blocks_per_replica=96)
    sim = Simulator(config, COST)
    result = sim.run(workload.requests(3, BS))
    assert all(s.finished_s is not None for s in result.seqs)
    for replica in sim.replicas:
        cache = replica.cache
        cache.check_integrity()
        assert cache.used == 0 and cache.anonymous == 0  # nothing leaked
        assert cache.evictions > 0  # the pool was too small: LRU was exercised
    cache = BlockCache(4)
    cache.allocate(3)
    assert [cache.register(k) for k in (7, 8, 9)] == [True, True, True]
    cache.release([7, 8, 9], 0)
    assert cache.allocate(3) == [9, 8]  # the tail goes first, the head stays cached
    assert cache.match([7, 8]) == 1 and cache.free == 0
    with pytest.raises(ValueError, match="blocks asked"):
        cache.allocate(2)


@pytest.mark.parametrize("shape", [0.5, 2.0])
def test_arrivals_match_the_configured_gamma(shape: float) -> None:
    rate = 4.0
    shaped = BurstGPTShape(gamma_shape=shape, max_len=4)  # short texts: quick to key
    workload = ChatWorkload(sessions=20_000, rate=rate, system_len=1, shape=shaped)
    arrivals = np.array([r.arrival_s for r in workload.requests(0, BS)])
    gaps = np.diff(arrivals)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(shape), rel=0.05)
    lengths = BurstGPTShape().lengths(np.random.default_rng(0), 10_000)
    assert max(lengths) < 1024 and min(lengths) >= 1


def test_fit_recovers_known_coefficients() -> None:
    works = [
        StepWork(1, 1, 0, 50), StepWork(4, 4, 0, 800), StepWork(100, 1, 5050, 0),
        StepWork(300, 1, 45150, 0), StepWork(8, 8, 0, 2000), StepWork(40, 2, 900, 0),
    ]  # fmt: skip
    fit = fit_step_cost([StepSample(w, COST.seconds(w)) for w in works for _ in range(3)])
    for name in FEATURES:
        assert getattr(fit, name) == pytest.approx(getattr(COST, name), rel=1e-6)
    assert fit.fit["kinds"] == len(works)  # repeats of a kind fit as their median


def test_bad_values_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="prefill_replicas"):
        SimConfig(replicas=2, prefill_replicas=2)
    with pytest.raises(ValueError, match="unknown router"):
        SimConfig(router="random")
    with pytest.raises(ValueError, match="per_decode_pair_s"):
        StepCost(0.0, 0.0, 0.0, 0.0, -1.0)
    with pytest.raises(ValueError, match="gamma_shape"):
        BurstGPTShape(gamma_shape=0)
    with pytest.raises(ValueError, match="output"):
        SimRequest(0, 0.0, 10, 0, ())
