"""`strata serve --replicas N`: start the replicas on Ray Serve, serve the front with
uvicorn until stopped, then delete the replicas (and stop the Ray cluster if this
process started it), so no Ray actor or process outlives the command."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import uvicorn

from strata.server.config import ServeConfig
from strata.server.replicas.cluster import ReplicaSet
from strata.server.replicas.front import Front
from strata.server.replicas.front_app import build_front_app

logger = logging.getLogger("strata.server")


def serve_replicas(
    engine_kwargs: dict[str, Any], model_name: str, config: ServeConfig, log_level: str
) -> int:
    if importlib.util.find_spec("ray") is None:  # without importing it: seconds
        raise ValueError("--replicas needs Ray Serve: pip install 'ray[serve]' (the `ray` extra)")
    replicas = ReplicaSet(config)
    try:
        replicas.start(engine_kwargs, model_name)
        app = build_front_app(Front(replicas.handles, config, model_name))
        server = uvicorn.Server(uvicorn.Config(
            app, host=config.host, port=config.port, log_level=log_level.lower(),
            access_log=False, timeout_graceful_shutdown=int(config.shutdown_timeout_s),
        ))  # fmt: skip
        logger.info(
            "listening on http://%s:%d: %d replicas of %s, router %s",
            config.host, config.port, config.replicas, model_name, config.router,
        )  # fmt: skip
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it stopped on
        pass
    finally:
        replicas.shutdown()
    return 0
