"""How many GPUs each replica reserves from Ray (`--replica-gpus`), and the checks that
fail a start clearly before any replica loads."""

from __future__ import annotations

from typing import Any

import pytest

from strata.errors import StrataError
from strata.server.config import ServeConfig
from strata.server.replicas.cluster import ReplicaSet, check_gpus, gpus_per_replica


def test_a_cuda_engine_reserves_one_gpu_a_replica_by_default() -> None:
    config = ServeConfig(replicas=2)
    assert gpus_per_replica(config, {"device": "cuda"}) == 1.0
    assert gpus_per_replica(config, {"device": "cuda:0"}) == 1.0
    assert gpus_per_replica(config, {"device": "cpu"}) == 0.0
    assert gpus_per_replica(ServeConfig(replicas=2, replica_gpus=2), {"device": "cuda"}) == 2.0


def test_a_shared_gpu_needs_each_replicas_memory_within_its_share() -> None:
    config = ServeConfig(replicas=2, replica_gpus=0.5)
    with pytest.raises(ValueError, match=r"--gpu-memory-utilization \(got 0\.9\)"):
        gpus_per_replica(config, {"device": "cuda"})
    engine = {"device": "cuda", "gpu_memory_utilization": 0.45}
    assert gpus_per_replica(config, engine) == 0.5


def test_a_cuda_engine_that_reserves_no_gpu_is_refused() -> None:
    with pytest.raises(ValueError, match="a replica that reserves no GPU sees them all"):
        gpus_per_replica(ServeConfig(replicas=1, replica_gpus=0), {"device": "cuda"})


def test_replicas_must_fit_the_clusters_gpus() -> None:
    check_gpus(1.0, 0.5, 2)  # two halves share one GPU
    check_gpus(8.0, 1.0, 8)
    with pytest.raises(StrataError, match=r"3 replicas of --replica-gpus 0\.5 need 1\.5 GPUs"):
        check_gpus(1.0, 0.5, 3)


def test_the_deployment_reserves_the_replicas_gpus() -> None:
    pytest.importorskip("ray.serve")
    replicas = ReplicaSet(ServeConfig(replicas=2, replica_cpus=2), gpus=0.5)
    options: Any = replicas._deployment("replica-0").ray_actor_options
    assert options["num_cpus"] == 2 and options["num_gpus"] == 0.5
    options = ReplicaSet(ServeConfig(replicas=2))._deployment("replica-0").ray_actor_options
    assert "num_gpus" not in options
