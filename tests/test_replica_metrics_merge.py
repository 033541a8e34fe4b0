"""The front's merge of the replicas' metrics (metrics_merge.py) and its fetch of them
(Front.replica_metrics), without Ray: texts from real prometheus_client registries, and
fake replica handles."""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from strata.server.config import ServeConfig
from strata.server.replicas import front as front_module
from strata.server.replicas.front import Front
from strata.server.replicas.metrics_merge import render

Values = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def replica_text(finished: dict[str, int], latencies: list[float], running: float) -> str:
    registry = CollectorRegistry()
    counter = Counter("strata_request_finished", "Requests finished, by reason.",
                      ["finish_reason"], registry=registry)  # fmt: skip
    for reason, n in finished.items():
        counter.labels(finish_reason=reason).inc(n)
    histogram = Histogram("strata_e2e_request_latency_seconds", "Time to the last token.",
                          registry=registry, buckets=(0.1, 1.0))  # fmt: skip
    for latency in latencies:
        histogram.observe(latency)
    Gauge("strata_num_requests_running", "Requests running.", registry=registry).set(running)
    return generate_latest(registry).decode()


def values(text: str, drop: str | None = None) -> Values:
    """Every sample by (name, sorted labels), less the label `drop`; `_created` left out
    (its value is a clock)."""
    found: Values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.endswith("_created"):
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != drop))
                found[(s.name, labels)] = s.value
    return found


def by_replica(text: str) -> dict[str, Values]:
    split: dict[str, Values] = {}
    for (name, labels), value in values(text).items():
        replica = dict(labels)["replica"]
        rest = tuple((k, v) for k, v in labels if k != "replica")
        split.setdefault(replica, {})[(name, rest)] = value
    return split


def family_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("# HELP", "# TYPE"))]


TEXTS = {
    "replica-0": replica_text({"stop": 2, "length": 1}, [0.05, 0.5], 1),
    "replica-1": replica_text({"stop": 4}, [2.0], 0),
}


def test_each_family_once_and_every_sample_labelled_by_replica() -> None:
    merged = render(TEXTS).decode()
    lines = family_lines(merged)
    assert len(lines) == len(set(lines))  # one HELP and one TYPE per family
    assert "# TYPE strata_request_finished_total counter" in lines
    assert "# TYPE strata_e2e_request_latency_seconds histogram" in lines
    for family in text_string_to_metric_families(merged):
        for sample in family.samples:
            assert sample.labels["replica"] in ("replica-0", "replica-1")
    assert 'strata_request_finished_total{finish_reason="stop",replica="replica-1"} 4.0' in merged
    assert 'strata_replica_up{replica="replica-0"} 1.0' in merged


def test_the_merged_text_parses_back_to_each_replicas_values() -> None:
    merged = render(TEXTS).decode()
    split = by_replica(merged)
    up = ("strata_replica_up", ())
    for replica, text in TEXTS.items():
        assert split[replica].pop(up) == 1.0
        assert split[replica] == values(text)  # buckets, _sum, _count, _total: exact
    names = [family.name for family in text_string_to_metric_families(merged)]
    assert len(names) == len(set(names)) == 6  # up; counter, histogram, gauge; two _created


def test_a_missing_replica_is_down_and_adds_no_sample() -> None:
    merged = render({"replica-0": TEXTS["replica-0"], "replica-1": None}).decode()
    assert 'strata_replica_up{replica="replica-1"} 0.0' in merged
    assert set(by_replica(merged)) == {"replica-0", "replica-1"}
    assert list(by_replica(merged)["replica-1"]) == [("strata_replica_up", ())]
    assert 'replica="replica-1"' not in merged.replace('strata_replica_up{replica="replica-1"}', "")


def test_an_unreadable_text_counts_as_down() -> None:
    merged = render({"prefill-0": "not { a metric", "replica-0": TEXTS["replica-0"]}).decode()
    assert 'strata_replica_up{replica="prefill-0"} 0.0' in merged
    assert 'strata_replica_up{replica="replica-0"} 1.0' in merged


class FakeCall:
    """A handle call's response: awaitable, cancellable."""

    def __init__(self, text: str | None) -> None:
        self.text = text

    def __await__(self) -> Generator[Any, None, str]:
        return self._answer().__await__()

    async def _answer(self) -> str:
        if self.text is None:
            await asyncio.sleep(60)  # hangs: the front's timeout must cut it
        assert self.text is not None
        return self.text

    def cancel(self) -> None:
        pass


class FakeHandle:
    def __init__(self, text: str | None) -> None:
        self.text = text
        self.calls = 0

    @property
    def metrics(self) -> FakeHandle:
        return self

    def remote(self) -> FakeCall:
        self.calls += 1
        return FakeCall(self.text)


def test_a_replica_that_hangs_or_is_down_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(front_module, "METRICS_TIMEOUT_S", 0.2)
    handles = [FakeHandle(TEXTS["replica-0"]), FakeHandle(None), FakeHandle("x 1\n")]
    front = Front(handles, ServeConfig(replicas=3), "m")
    front.up[2] = False  # its last report timed out: not asked
    texts = asyncio.run(front.replica_metrics())
    assert texts == {"replica-0": TEXTS["replica-0"], "replica-1": None, "replica-2": None}
    assert [h.calls for h in handles] == [1, 1, 0]
