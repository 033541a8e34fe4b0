"""Unit tests of the serving benchmark's pieces: statistics, goodput, arrivals, the SSE
checker and the request generator. No server."""

from __future__ import annotations

import math

import numpy as np
import pytest

from strata.bench.arrivals import arrival_offsets, rate_label
from strata.bench.client import MalformedStreamError, StreamParser
from strata.bench.latency import SLO, CompletedRequest, LatencyStats, summarize, tpot_ms
from strata.bench.requests import WORDS, bench_requests
from strata.bench.serve import ServeBenchConfig

# ---- statistics -----------------------------------------------------------------------------


def test_percentiles_interpolate_between_ranks() -> None:
    stats = LatencyStats.of([40.0, 10.0, 30.0, 20.0, 50.0])  # order does not matter
    assert stats.count == 5 and stats.mean == 30.0
    assert stats.p50 == 30.0
    assert stats.p90 == pytest.approx(46.0, abs=1e-12)  # rank 3.6: 40 + 0.6 * 10
    assert stats.p99 == pytest.approx(49.6, abs=1e-12)  # rank 3.96
    assert LatencyStats.of([1.0, 2.0, 3.0, 4.0]).p50 == 2.5
    assert LatencyStats.of([7.0]) == LatencyStats(1, 7.0, 7.0, 7.0, 7.0)
    assert LatencyStats.of([]) == LatencyStats(0, None, None, None, None)


def test_tpot_excludes_the_first_token() -> None:
    assert tpot_ms(e2e_ms=1000.0, ttft_ms=100.0, output_tokens=10) == 100.0
    assert tpot_ms(e2e_ms=1000.0, ttft_ms=100.0, output_tokens=1) is None


def test_slo_met() -> None:
    slo = SLO(ttft_ms=100.0, tpot_ms=10.0)
    assert slo.met(100.0, 10.0) and not slo.met(100.1, 5.0) and not slo.met(50.0, 10.1)
    assert slo.met(50.0, None)  # a single-token answer has no TPOT
    assert SLO(ttft_ms=100.0).met(1.0, 1e9) and not SLO().is_set


def _done(ttft: float, e2e: float, out: int, itl: tuple[float, ...] = ()) -> CompletedRequest:
    return CompletedRequest(ttft, tpot_ms(e2e, ttft, out), itl, e2e, 10, out)


def test_summary_counts_throughput_and_goodput() -> None:
    completed = [
        _done(100.0, 1000.0, 10, (50.0, 60.0)),  # TPOT 100
        _done(300.0, 500.0, 3, (70.0,)),  # TTFT misses the objective; TPOT 100
        _done(50.0, 50.0, 1),  # no TPOT
    ]
    s = summarize(completed, num_requests=5, failed=1, duration_s=2.0, slo=SLO(200.0, 100.0))
    assert (s.completed, s.failed, s.lost) == (3, 1, 1)
    assert s.request_throughput == 1.5 and s.goodput == 1.0
    assert (s.input_tokens, s.output_tokens) == (30, 14)
    assert (s.input_throughput, s.output_throughput) == (15.0, 7.0)
    ttft = s.ttft_ms
    assert (ttft.count, ttft.mean, ttft.p50) == (3, 150.0, 100.0)
    assert (ttft.p90, ttft.p99) == pytest.approx((260.0, 296.0), abs=1e-9)  # ranks 1.8, 1.98
    assert s.tpot_ms == LatencyStats(2, 100.0, 100.0, 100.0, 100.0)
    assert s.itl_ms.count == 3 and s.itl_ms.p50 == 60.0
    assert s.e2e_ms.p50 == 500.0
    assert summarize(completed, 5, 1, 2.0, SLO()).goodput is None
    with pytest.raises(ValueError, match="completed"):
        summarize(completed, num_requests=3, failed=1, duration_s=1.0, slo=SLO())


# ---- arrivals -------------------------------------------------------------------------------


def test_arrivals_are_deterministic_and_start_at_zero() -> None:
    a = arrival_offsets(50, 4.0, 1.0, seed=7)
    assert a == arrival_offsets(50, 4.0, 1.0, seed=7)
    assert a != arrival_offsets(50, 4.0, 1.0, seed=8)
    assert a[0] == 0.0 and a == sorted(a)
    assert arrival_offsets(3, math.inf, 0.5, seed=0) == [0.0, 0.0, 0.0]
    assert arrival_offsets(0, 1.0, 1.0, seed=0) == []


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_arrivals_keep_the_mean_rate_and_burstiness_sets_the_spread(burstiness: float) -> None:
    n, rate = 40001, 8.0
    gaps = np.diff(arrival_offsets(n, rate, burstiness, seed=0))
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)
    # gamma gaps of shape B have a coefficient of variation of 1 / sqrt(B)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.1)


def test_arrivals_reject_bad_parameters() -> None:
    with pytest.raises(ValueError, match="rate"):
        arrival_offsets(4, 0.0, 1.0, seed=0)
    with pytest.raises(ValueError, match="burstiness"):
        arrival_offsets(4, 1.0, 0.0, seed=0)
    assert [rate_label(r) for r in (math.inf, 4.0, 0.5)] == ["inf", "4", "0.5"]


# ---- stream checks --------------------------------------------------------------------------


def _feed(parser: StreamParser, lines: list[str]) -> None:
    for t, line in enumerate(lines):
        parser.feed(line, float(t))


def test_parser_times_content_chunks_and_reads_usage() -> None:
    parser = StreamParser("chat")
    _feed(parser, [
        'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}',
        "",
        ": keep-alive",
        'data: {"choices": [{"index": 0, "delta": {"content": "Hel"}}]}',
        'data: {"choices": [{"index": 0, "delta": {"content": ""}}]}',
        'data: {"choices": [{"index": 0, "delta": {"content": "lo"}}]}',
        'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}',
        'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}',
        "data: [DONE]",
    ])  # fmt: skip
    parser.check_complete()
    assert parser.content_times == [3.0, 5.0]  # empty deltas carry no content
    assert parser.usage == {"prompt_tokens": 5, "completion_tokens": 3}
    assert parser.finish_reason == "length"


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            ['data: {"choices": [{"text": "a", "finish_reason": "length"}]}'],
            r"without data: \[DONE\]",
        ),
        (["data: [DONE]"], "no content"),
        (['data: {"choices": [{"text": "a"}]}', "data: [DONE]"], "finish_reason"),
        (['data: {"error": {"message": "boom"}}'], "error chunk: boom"),
        (["data: {not json"], "not JSON"),
        (["data: [1, 2]"], "not a JSON object"),
        (['data: {"id": "x"}'], "choices"),
        (["garbage"], "not an SSE data line"),
        (["data: [DONE]", 'data: {"choices": []}'], "after"),
        (['data: {"choices": [{"text": 5}]}'], "not a string"),
        (['data: {"choices": [], "usage": {"prompt_tokens": 1}}'], "malformed usage"),
    ],
)
def test_parser_rejects_malformed_streams(lines: list[str], message: str) -> None:
    parser = StreamParser("completions")
    with pytest.raises(MalformedStreamError, match=message):
        _feed(parser, lines)
        parser.check_complete()


# ---- requests and config --------------------------------------------------------------------


def test_text_prompts_have_the_token_prompts_lengths() -> None:
    ids = bench_requests(6, (4, 12), (2, 9), "token-ids", seed=3)
    text = bench_requests(6, (4, 12), (2, 9), "text", seed=3)
    assert ids == bench_requests(6, (4, 12), (2, 9), "token-ids", seed=3)
    for a, b in zip(ids, text, strict=True):
        assert isinstance(a.prompt, list) and isinstance(b.prompt, str)
        assert (a.index, a.prompt_len, a.output_len) == (b.index, b.prompt_len, b.output_len)
        assert len(a.prompt) == a.prompt_len == len(b.prompt.split())
        assert all(100 <= t < 32000 for t in a.prompt)
        assert b.prompt.split() == [WORDS[t % len(WORDS)] for t in a.prompt]
        assert 4 <= a.prompt_len <= 12 and 2 <= a.output_len <= 9


def test_config_rejects_what_cannot_run() -> None:
    with pytest.raises(ValueError, match="text"):
        ServeBenchConfig(url="http://x", endpoint="chat", prompts="token-ids")
    with pytest.raises(ValueError, match="http"):
        ServeBenchConfig(url="localhost:8000")
    with pytest.raises(ValueError, match="rate"):
        ServeBenchConfig(url="http://x", request_rates=(0.0,))
    with pytest.raises(ValueError, match="slo-ttft-ms"):
        ServeBenchConfig(url="http://x", slo=SLO(ttft_ms=-1.0))
    assert ServeBenchConfig(url="http://x", endpoint="chat").prompt_kind == "text"
