"""ServeConfig: the HTTP side of `strata serve` (the engine's options are EngineConfig's)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from strata.options import option


@dataclass(frozen=True)
class ServeConfig:
    host: str = field(default="127.0.0.1", metadata=option("address to bind (default 127.0.0.1)"))
    port: int = field(default=8000, metadata=option("port to bind (default 8000)"))
    api_key: str | None = field(default=None, metadata=option(
        "require 'Authorization: Bearer KEY' on /v1 routes (default: $STRATA_API_KEY; "
        "unset = no key)",
    ))  # fmt: skip
    served_model_name: str | None = field(default=None, metadata=option(
        "the model name clients send and /v1/models lists (default: the --model value, "
        "or smollm2-135m for the embedded model)",
    ))  # fmt: skip
    max_waiting_requests: int | None = field(default=None, metadata=option(
        "answer 429 with Retry-After once N requests are waiting (default: unlimited)",
        metavar="N",
    ))  # fmt: skip
    tool_call_parser: Literal["hermes", "llama3_json"] | None = field(default=None, metadata=option(
        "how tool calls are read from the output under tool_choice auto: hermes "
        "(<tool_call> JSON blocks, Qwen2/2.5) or llama3_json (Llama 3.1 JSON) (default: "
        "chosen from the chat template; hermes for templates without a tool section)",
        metavar="NAME",
    ))  # fmt: skip
    shutdown_timeout_s: float = field(default=30.0, metadata=option(
        "on SIGTERM, let requests in flight finish for this long (default 30)",
        flag="--shutdown-timeout", metavar="SECONDS",
    ))  # fmt: skip

    def __post_init__(self) -> None:
        if self.max_waiting_requests is not None and self.max_waiting_requests < 1:
            raise ValueError(
                f"--max-waiting-requests must be >= 1, got {self.max_waiting_requests}"
            )
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")
