"""`strata serve --replicas N` (or --prefill-replicas P --decode-replicas D): start the
replicas on Ray Serve, serve the front with uvicorn until stopped, then delete the
replicas (and stop the Ray cluster if this process started it), so no Ray actor or
process outlives the command."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import uvicorn

from strata.server.config import ServeConfig
from strata.server.replicas.cluster import ReplicaSet
from strata.server.replicas.front import Front
from strata.server.replicas.front_app import build_front_app
from strata.server.replicas.prefill import PrefillStage

logger = logging.getLogger("strata.server")


def serve_replicas(
    engine_kwargs: dict[str, Any], model_name: str, config: ServeConfig, log_level: str
) -> int:
    if config.disaggregated and not engine_kwargs.get("kv_remote"):
        raise ValueError("--prefill-replicas needs --kv-remote URL: prefill replicas hand "
                         "the prompt's KV blocks to the decode replicas through that shared tier")
    if importlib.util.find_spec("ray") is None:  # without importing it: seconds
        flag = "--prefill-replicas" if config.disaggregated else "--replicas"
        raise ValueError(f"{flag} needs Ray Serve: pip install 'ray[serve]' (the `ray` extra)")
    replicas = ReplicaSet(config)
    try:
        replicas.start(engine_kwargs, model_name)
        prefill = None
        if config.disaggregated:
            prefill = PrefillStage(replicas.prefill_handles, config, model_name)
        app = build_front_app(Front(replicas.handles, config, model_name), prefill)
        server = uvicorn.Server(uvicorn.Config(
            app, host=config.host, port=config.port, log_level=log_level.lower(),
            access_log=False, timeout_graceful_shutdown=int(config.shutdown_timeout_s),
        ))  # fmt: skip
        pools = (f"{config.prefill_replicas} prefill + {config.decode_replicas} decode"
                 if config.disaggregated else str(config.replicas))  # fmt: skip
        logger.info(
            "listening on http://%s:%d: %s replicas of %s, router %s",
            config.host, config.port, pools, model_name, config.router,
        )  # fmt: skip
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it stopped on
        pass
    finally:
        replicas.shutdown()
    return 0
