"""ReplicaSet: N EngineReplica deployments on Ray Serve, and how they start and stop.

One Serve application, "strata", deploys them together (they load in parallel): its
ingress `ReplicaGroup` only holds them; deployment `replica-i` is replica i, one Serve
replica each, so the front can address each one and Serve restarts it if it dies.
Disaggregated (--prefill-replicas P), deployments `prefill-0..P-1` join them: the same
EngineReplica, asked only to prefill (prefill.py); `replica-i` are then the decode ones.
Serve's own HTTP proxy stays off: the front (front.py) is the only HTTP server.

On CUDA each replica reserves GPUs from Ray (--replica-gpus, default 1), and Ray shows
it only those (CUDA_VISIBLE_DEVICES). A replica that reserved none would see every GPU
and load on the first, beside all the others.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from typing import Any

from strata.config import CacheConfig
from strata.errors import StrataError
from strata.server.config import ServeConfig
from strata.server.replicas.replica import EngineReplica

logger = logging.getLogger("strata.server")

APP_NAME = "strata"
HEALTH_CHECK_PERIOD_S = 2.0
CONNECT_TIMEOUT_S = 5.0


class ReplicaGroup:
    """The application's ingress: it holds the replica deployments, nothing more."""

    def __init__(self, *replicas: Any) -> None:
        self.replicas = replicas


def check_reachable(address: str) -> None:
    """Fail fast, with the address in the message, when host:port does not answer."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--ray-address must be host:port or 'auto', got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise StrataError(
            f"cannot reach the Ray cluster at {address} ({exc}); start one with `ray start "
            "--head`, or leave out --ray-address to start a local one"
        ) from exc


def gpus_per_replica(config: ServeConfig, engine_kwargs: dict[str, Any]) -> float:
    """GPUs each replica reserves: --replica-gpus, else 1 when the engine runs on CUDA (its
    --device, or CUDA on this machine when none is given), else 0. ValueError for a CUDA
    engine that reserves none, or a GPU share smaller than the memory it may use."""
    device = engine_kwargs.get("device")
    if device is None:
        import torch

        cuda = torch.cuda.is_available()
    else:
        cuda = str(device).startswith("cuda")
    gpus = config.replica_gpus if config.replica_gpus is not None else float(cuda)
    if cuda and gpus == 0:
        raise ValueError("--replica-gpus 0 with a CUDA engine: a replica that reserves no "
                         "GPU sees them all and loads on the first, so every replica would "
                         "share one (give --device cpu to serve on CPUs)")  # fmt: skip
    share = engine_kwargs.get("gpu_memory_utilization", CacheConfig.gpu_memory_utilization)
    if 0 < gpus < 1 and share > gpus:
        raise ValueError(f"--replica-gpus {gpus:g} shares a GPU between replicas: give each "
                         f"at most that share of its memory with --gpu-memory-utilization "
                         f"(got {share:g})")  # fmt: skip
    return gpus


def check_gpus(have: float, per_replica: float, replicas: int) -> None:
    """StrataError when `replicas` replicas of `per_replica` GPUs do not fit in `have`."""
    need = per_replica * replicas
    if need > have + 1e-9:
        raise StrataError(f"{replicas} replicas of --replica-gpus {per_replica:g} need "
                          f"{need:g} GPUs; the Ray cluster has {have:g}")  # fmt: skip


@dataclass
class ReplicaSet:
    config: ServeConfig
    handles: list[Any] = field(default_factory=list)  # serve DeploymentHandle per replica
    prefill_handles: list[Any] = field(default_factory=list)  # disaggregated: the prefill ones
    started_ray: bool = False
    gpus: float = 0.0  # each replica's reservation (gpus_per_replica)

    def start(self, engine_kwargs: dict[str, Any], model_name: str) -> None:
        self.gpus = gpus_per_replica(self.config, engine_kwargs)
        if self.config.ray_address is not None:
            check_reachable(self.config.ray_address)  # before importing Ray: seconds
        names = [f"replica-{i}" for i in range(self.config.num_replicas or 1)]
        prefill = [f"prefill-{i}" for i in range(self.config.prefill_replicas or 0)]
        self._init_ray(len(names) + len(prefill))
        from ray import serve

        serve.start(proxy_location="Disabled")
        parts = [self._deployment(name).bind(engine_kwargs, model_name, self.config)
                 for name in (*names, *prefill)]  # fmt: skip
        group: Any = serve.deployment(ReplicaGroup)
        ingress = group.options(name="group", ray_actor_options={"num_cpus": 0})
        logger.info("starting %d replicas on Ray Serve", len(parts))
        serve.run(ingress.bind(*parts), name=APP_NAME, route_prefix=None)
        self.handles = [serve.get_deployment_handle(name, APP_NAME) for name in names]
        self.prefill_handles = [serve.get_deployment_handle(name, APP_NAME) for name in prefill]

    def _init_ray(self, replicas: int) -> None:
        """Join --ray-address or start a local cluster, after checking the GPUs fit (a local
        cluster's GPUs are this machine's, counted before Ray starts)."""
        import ray

        if self.config.ray_address is not None:
            ray.init(address=self.config.ray_address, log_to_driver=True)
            try:
                check_gpus(ray.cluster_resources().get("GPU", 0.0), self.gpus, replicas)
            except StrataError:
                ray.shutdown()  # nothing of ours runs there yet: leave the cluster as it was
                raise
            return
        gpus = 0
        if self.gpus:
            import torch

            gpus = torch.cuda.device_count()
            check_gpus(gpus, self.gpus, replicas)
        cpus = max(2, int(replicas * self.config.replica_cpus + 0.999))
        ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=True)
        self.started_ray = True
        logger.info("local Ray cluster: %d CPUs, %d GPUs; each replica reserves %g CPUs, "
                    "%g GPUs", cpus, gpus, self.config.replica_cpus, self.gpus)  # fmt: skip

    def _deployment(self, name: str) -> Any:
        from ray import serve

        replica: Any = serve.deployment(EngineReplica)
        resources = {"num_cpus": self.config.replica_cpus}
        if self.gpus:
            resources["num_gpus"] = self.gpus
        return replica.options(
            name=name, num_replicas=1,
            ray_actor_options=resources,
            max_ongoing_requests=1 << 16,  # the engine queues; max_waiting_requests bounds it
            health_check_period_s=HEALTH_CHECK_PERIOD_S,
            max_constructor_retry_count=1,  # a model that fails to load fails the start
            graceful_shutdown_timeout_s=self.config.shutdown_timeout_s,
        )  # fmt: skip

    def shutdown(self) -> None:
        """Delete the application; stop the local cluster if this process started it."""
        import ray
        from ray import serve

        if not ray.is_initialized():
            return
        try:
            if self.started_ray:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        finally:
            ray.shutdown()
