"""A front over replicas on a local Ray cluster, inside the test process (uvicorn on a
loopback port), as `strata serve --replicas N` (or --prefill-replicas P
--decode-replicas D) runs it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn

from strata.server.config import ServeConfig
from strata.server.replicas.cluster import ReplicaSet
from strata.server.replicas.front import Front
from strata.server.replicas.front_app import build_front_app
from strata.server.replicas.prefill import PrefillStage
from tests.server_utils import free_port


@dataclass
class RunningReplicas:
    url: str
    front: Front
    replicas: ReplicaSet
    server: uvicorn.Server
    thread: threading.Thread
    prefill: PrefillStage | None = None

    def blocks(self, replica: int) -> set[bytes]:
        return set(self.replicas.handles[replica].blocks.remote().result())

    def stats(self, replica: int, role: str = "replica") -> dict[str, Any]:
        """A replica's engine stats (tier counters among them): a decode or co-located
        replica, or with role "prefill" a prefill replica."""
        handles = self.replicas.prefill_handles if role == "prefill" else self.replicas.handles
        return dict(handles[replica].stats.remote().result())

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.replicas.shutdown()


def start_replicas(engine_kwargs: dict[str, Any], **options: Any) -> RunningReplicas:
    config = ServeConfig(port=free_port(), **options)
    replicas = ReplicaSet(config)
    try:
        replicas.start(engine_kwargs, "test-model")
    except BaseException:
        replicas.shutdown()
        raise
    front = Front(replicas.handles, config, "test-model")
    prefill = None
    if config.disaggregated:
        prefill = PrefillStage(replicas.prefill_handles, config, "test-model")
    server = uvicorn.Server(
        uvicorn.Config(build_front_app(front, prefill), port=config.port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{config.port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return RunningReplicas(url, front, replicas, server, thread, prefill)
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    replicas.shutdown()
    raise TimeoutError("the front did not become healthy")
