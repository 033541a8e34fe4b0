"""The replicas' own metrics, merged into one Prometheus text for the front's /metrics.

Each replica serves its app's registry (metrics.py) as text; the front parses every
replica's text and re-emits it with the client library, so that:

- each metric family appears once (one HELP and TYPE), with the samples of every replica
  that has it, each sample labelled `replica="<role>-<i>"` (any `replica` label of its own
  is replaced), in the order the replicas are given;
- sample names and values pass through as parsed: histogram buckets, `_sum`, `_count`,
  counters' `_total` and the `_created` gauges come out as the replica wrote them;
- `strata_replica_up{replica=...}` is 1 for a replica whose text was read, 0 for one that
  did not answer (None) or whose text does not parse; such a replica adds no sample.

The replicas run the same code, so one family name has one type everywhere: the first
replica's family fixes HELP and TYPE, and another replica's family of the same name with
another type is dropped (the output stays valid). The names do not clash with the front's
own registries (strata_router_*, strata_prefill_router_*, strata_prefill_*), which are
rendered before this text.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

logger = logging.getLogger("strata.server")

REPLICA_LABEL = "replica"
UP = "strata_replica_up"


def parse(text: str) -> list[Metric] | None:
    """The families of one replica's text; None when it does not parse."""
    try:
        return list(text_string_to_metric_families(text))  # the parser is lazy
    except ValueError as exc:
        logger.warning("unreadable replica metrics: %s", exc)
        return None


def merge(texts: Mapping[str, str | None]) -> list[Metric]:
    """The up gauge, then every family of the replicas' texts (replica name -> text; None:
    it did not answer), each once with all replicas' samples, labelled by replica."""
    up = GaugeMetricFamily(UP, "1 when the replica's metrics were read, else 0.",
                           labels=[REPLICA_LABEL])  # fmt: skip
    merged: dict[str, Metric] = {}
    for replica, text in texts.items():
        families = None if text is None else parse(text)
        up.add_metric([replica], 0.0 if families is None else 1.0)
        for family in families or ():
            into = merged.setdefault(family.name, _empty_like(family))
            if into.type != family.type:
                continue  # see the module docstring: never the case for one code base
            for sample in family.samples:
                labels = {**sample.labels, REPLICA_LABEL: replica}
                into.samples.append(sample._replace(labels=labels))
    return [up, *merged.values()]


def _empty_like(family: Metric) -> Metric:
    return Metric(family.name, family.documentation, family.type, family.unit)


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def render(texts: Mapping[str, str | None]) -> bytes:
    """`merge(texts)` in the Prometheus text format (generate_latest)."""
    registry = CollectorRegistry(auto_describe=False)  # collected only at generate_latest
    registry.register(_Families(merge(texts)))
    return generate_latest(registry)
