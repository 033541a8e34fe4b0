"""ReplicaSet: N EngineReplica deployments on Ray Serve, and how they start and stop.

One Serve application, "strata", deploys them together (they load in parallel): its
ingress `ReplicaGroup` only holds them; deployment `replica-i` is replica i, one Serve
replica each, so the front can address each one and Serve restarts it if it dies.
Disaggregated (--prefill-replicas P), deployments `prefill-0..P-1` join them: the same
EngineReplica, asked only to prefill (prefill.py); `replica-i` are then the decode ones.
Serve's own HTTP proxy stays off: the front (front.py) is the only HTTP server.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from typing import Any

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


@dataclass
class ReplicaSet:
    config: ServeConfig
    handles: list[Any] = field(default_factory=list)  # serve DeploymentHandle per replica
    prefill_handles: list[Any] = field(default_factory=list)  # disaggregated: the prefill ones
    started_ray: bool = False

    def start(self, engine_kwargs: dict[str, Any], model_name: str) -> None:
        if self.config.ray_address is not None:
            check_reachable(self.config.ray_address)  # before importing Ray: seconds
        import ray
        from ray import serve

        names = [f"replica-{i}" for i in range(self.config.num_replicas or 1)]
        prefill = [f"prefill-{i}" for i in range(self.config.prefill_replicas or 0)]
        if self.config.ray_address is not None:
            ray.init(address=self.config.ray_address, log_to_driver=True)
        else:
            cpus = max(2, int((len(names) + len(prefill)) * self.config.replica_cpus + 0.999))
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True)
            self.started_ray = True
        serve.start(proxy_location="Disabled")
        parts = [self._deployment(name).bind(engine_kwargs, model_name, self.config)
                 for name in (*names, *prefill)]  # fmt: skip
        group: Any = serve.deployment(ReplicaGroup)
        ingress = group.options(name="group", ray_actor_options={"num_cpus": 0})
        logger.info("starting %d replicas on Ray Serve", len(parts))
        serve.run(ingress.bind(*parts), name=APP_NAME, route_prefix=None)
        self.handles = [serve.get_deployment_handle(name, APP_NAME) for name in names]
        self.prefill_handles = [serve.get_deployment_handle(name, APP_NAME) for name in prefill]

    def _deployment(self, name: str) -> Any:
        from ray import serve

        replica: Any = serve.deployment(EngineReplica)
        return replica.options(
            name=name, num_replicas=1,
            ray_actor_options={"num_cpus": self.config.replica_cpus},
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
