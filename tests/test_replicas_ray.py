"""`strata serve --replicas`: two replicas of a tiny model on one local Ray cluster
(started once for the module), behind the front, with the KV-aware router."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from strata.cli import main
from strata.errors import StrataError
from strata.server.config import ServeConfig
from strata.server.replicas.cluster import ReplicaSet
from tests.replicas_utils import RunningReplicas, start_replicas

pytest.importorskip("ray.serve")

SYSTEM = [
    "You are a terse assistant for a bakery. Answer in one short sentence. " * 4,
    "You translate English into French, word for word, and add nothing else. " * 4,
]


@pytest.fixture(scope="module")
def replicas(tiny_chat_folder: Path) -> Iterator[RunningReplicas]:
    engine = {"model": str(tiny_chat_folder), "device": "cpu", "num_kv_blocks": 64}
    running = start_replicas(engine, replicas=2, replica_cpus=1, router="kv-aware")
    yield running
    running.close()


def chat(r: RunningReplicas, system: str, user: str, **extra: Any) -> httpx.Response:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    body = {"messages": messages, "max_tokens": 3, **extra}
    response = httpx.post(f"{r.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response


def synced(r: RunningReplicas) -> None:
    """Wait until the front has applied every event the replicas published (it polls)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if all(r.front.index.keys_of(i) == r.blocks(i) for i in range(2)):
            for handle in r.replicas.handles:  # the engines' integrity, as conftest checks
                handle.check_integrity.remote().result()
            return
        time.sleep(0.1)
    raise AssertionError("the router's index does not match the replicas' blocks")


def test_same_prefix_goes_to_its_holder_and_load_breaks_ties(replicas: RunningReplicas) -> None:
    # Nothing cached anywhere, nothing in flight: the lower replica number wins the tie.
    assert chat(replicas, SYSTEM[0], "Do you sell rye?").headers["x-strata-replica"] == "replica-0"
    synced(replicas)
    messages = [{"role": "system", "content": SYSTEM[0]}, {"role": "user", "content": "Go on"}]
    body = {"messages": messages, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{replicas.url}/v1/chat/completions", json=body, timeout=60) as s:
        assert s.headers["x-strata-replica"] == "replica-0"  # the prefix's holder
        lines = s.iter_lines()
        next(line for line in lines if '"content": "' in line and '"content": ""' not in line)
        # Held by neither: replica 0 has a request in flight, so replica 1 takes it.
        assert chat(replicas, SYSTEM[1], "Morning").headers["x-strata-replica"] == "replica-1"
        assert [line for line in lines if line][-1] == "data: [DONE]"
    synced(replicas)
    for _ in range(2):
        for system, holder in ((SYSTEM[0], "replica-0"), (SYSTEM[1], "replica-1")):
            response = chat(replicas, system, f"A new user {time.monotonic()}")
            assert response.headers["x-strata-replica"] == holder
            assert response.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 64
            synced(replicas)


def test_router_index_matches_the_replicas_blocks(replicas: RunningReplicas) -> None:
    streamed = chat(replicas, SYSTEM[0], "Stream it", stream=True)
    assert streamed.text.rstrip().endswith("data: [DONE]")
    synced(replicas)
    for i in range(2):
        assert len(replicas.blocks(i)) >= 5
        assert replicas.front.index.keys_of(i) == replicas.blocks(i)


def test_metrics_count_routing_decisions_by_reason(replicas: RunningReplicas) -> None:
    text = httpx.get(f"{replicas.url}/metrics").text
    decisions = "strata_router_decisions_total"
    assert f'{decisions}{{reason="prefix",replica="replica-0",router="kv-aware"}}' in text
    assert 'reason="load",replica="replica-1"' in text


def finished_by_replica(r: RunningReplicas) -> tuple[dict[str, float], dict[str, float]]:
    """From the front's /metrics: requests finished per replica (all reasons), and up."""
    text = httpx.get(f"{r.url}/metrics").text
    finished: dict[str, float] = {}
    up: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "strata_request_finished_total":
                replica = s.labels["replica"]
                finished[replica] = finished.get(replica, 0.0) + s.value
            elif s.name == "strata_replica_up":
                up[s.labels["replica"]] = s.value
    return finished, up


def test_metrics_hold_every_replicas_own_metrics(replicas: RunningReplicas) -> None:
    before, _ = finished_by_replica(replicas)
    sent = {"replica-0": 0, "replica-1": 0}
    for system in (*SYSTEM, *SYSTEM):
        sent[chat(replicas, system, "Metrics?").headers["x-strata-replica"]] += 1
    deadline = time.monotonic() + 10  # a replica counts a request as its handler closes
    while True:
        after, up = finished_by_replica(replicas)
        deltas = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in sent}
        if deltas == sent or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert deltas == sent and sum(deltas.values()) == 4
    assert {name for name, n in sent.items() if n} <= set(after)
    assert up == {"replica-0": 1.0, "replica-1": 1.0}


def test_a_dead_replica_cuts_its_streams_and_comes_back(replicas: RunningReplicas) -> None:
    import ray

    names = ray.util.list_named_actors(all_namespaces=True)
    name = next(a["name"] for a in names if "#replica-1#" in a["name"])
    messages = [{"role": "system", "content": SYSTEM[1]}, {"role": "user", "content": "Go on"}]
    body = {"messages": messages, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{replicas.url}/v1/chat/completions", json=body, timeout=60) as s:
        assert s.headers["x-strata-replica"] == "replica-1"  # the prefix's holder
        lines = s.iter_lines()
        next(line for line in lines if '"content": "' in line and '"content": ""' not in line)
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        tail = [line for line in lines if line]
    assert '"error"' in tail[-2] and tail[-1] == "data: [DONE]"
    deadline = time.monotonic() + 10  # its next report times out: the router avoids it
    while time.monotonic() < deadline and replicas.front.up[1]:
        time.sleep(0.1)
    response = chat(replicas, SYSTEM[1], "Are you there?")
    assert response.headers["x-strata-replica"] == "replica-0"
    deadline = time.monotonic() + 90  # Serve starts a new replica 1, its cache empty
    while time.monotonic() < deadline and not replicas.front.up[1]:
        time.sleep(0.2)
    synced(replicas)
    assert replicas.blocks(1) == set()
    assert "strata_router_cut_streams_total 1.0" in httpx.get(f"{replicas.url}/metrics").text


@pytest.mark.parametrize(("argv", "message"), [
    (["--replicas", "0"], "--replicas must be >= 1, got 0"),
    (["--ray-address", "127.0.0.1:9"], "--ray-address needs --replicas N"),
    (["--replicas", "1", "--ray-address", "127.0.0.1:9"], "cannot reach the Ray cluster at"),
    (["--replicas", "2", "--replica-gpus", "1"],
     "2 replicas of --replica-gpus 1 need 2 GPUs; the Ray cluster has 0"),
    (["--replicas", "2", "--replica-gpus", "-1"], "--replica-gpus must be a fraction in [0, 1]"),
    (["--replicas", "2", "--replica-gpus", "1.5"], "or a whole number of GPUs, got 1.5"),
])  # fmt: skip
def test_bad_replica_options_fail_clearly(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


def test_unreachable_address_fails_before_joining() -> None:
    started = time.monotonic()
    with pytest.raises(StrataError, match=r"cannot reach the Ray cluster at 127\.0\.0\.1:9"):
        ReplicaSet(ServeConfig(replicas=2, ray_address="127.0.0.1:9")).start({}, "m")
    assert time.monotonic() - started < 10


def _cluster_processes() -> list[psutil.Process]:
    """This cluster's processes (GCS, raylet, workers): their command lines name its GCS port."""
    import ray

    port = ray.get_runtime_context().gcs_address.rpartition(":")[2]
    found = []
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or ())
        if "ray" in command and port in command:
            found.append(process)
    return found


def test_shutdown_leaves_no_ray_actor_or_process(replicas: RunningReplicas) -> None:
    import ray

    processes = _cluster_processes()
    assert len(processes) >= 4  # GCS, raylet, the Serve controller, the replicas
    replicas.close()
    assert not ray.is_initialized()
    _, alive = psutil.wait_procs(processes, timeout=15)
    assert alive == []
