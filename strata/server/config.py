"""ServeConfig: the HTTP side of `strata serve` (the engine's options are EngineConfig's)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from strata.options import check_choices, option
from strata.server.key_file import read_key_file

DEFAULT_MAX_REQUEST_BYTES = 4 << 20
# registry: server.replicas.routers ROUTERS (tests/test_replicas_routing.py checks it)
RouterName = Literal["kv-aware", "least-loaded", "round-robin"]


@dataclass(frozen=True)
class ServeConfig:
    host: str = field(default="127.0.0.1", metadata=option("address to bind (default 127.0.0.1)"))
    port: int = field(default=8000, metadata=option("port to bind (default 8000)"))
    api_key: tuple[str, ...] | None = field(default=None, metadata=option(
        "require 'Authorization: Bearer KEY' on every route but /health (default: "
        "$STRATA_API_KEY; unset = no key); give it once per key: each key is a tenant",
        metavar="KEY", repeat=True,
    ))  # fmt: skip
    api_key_file: str | None = field(default=None, metadata=option(
        "also accept the keys in this file, one per line; each key is a tenant, and with "
        "several keys tenants never share cached KV (prefix cache and tiers)",
        metavar="PATH",
    ))  # fmt: skip
    public_metrics: bool = field(default=False, metadata=option(
        "serve /metrics without the API key (for a scraper)",
    ))  # fmt: skip
    max_request_bytes: int = field(default=DEFAULT_MAX_REQUEST_BYTES, metadata=option(
        "answer 413 to a request body larger than this, before reading it in full "
        f"(default {DEFAULT_MAX_REQUEST_BYTES >> 20} MiB: a full 128k-token context as "
        "token ids fits)",
        metavar="BYTES",
    ))  # fmt: skip
    allow_special_tokens_in_content: bool = field(default=False, metadata=option(
        "let chat message contents produce the model's control tokens (a user could then "
        "forge a system turn); by default only the chat template produces them",
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
    engine_in_process: bool = field(default=False, metadata=option(
        "run the engine on a thread of the HTTP server's process (default: in a process of "
        "its own, so that HTTP work and the engine loop do not share one GIL); for "
        "debugging, and for tests that reach the engine object",
    ))  # fmt: skip
    api_server_count: int = field(default=1, metadata=option(
        "run N HTTP front-end processes (JSON, SSE, tokenization) on the one --host:--port, "
        "all served by one engine process: for when one process's HTTP work, not the "
        "engine, limits throughput (default 1; not with --engine-in-process or --replicas)",
        metavar="N",
    ))  # fmt: skip
    replicas: int | None = field(default=None, metadata=option(
        "serve from N engine replicas on Ray Serve behind this one HTTP front (needs the "
        "ray extra); starts a local Ray cluster unless --ray-address names one (default: "
        "one engine in this process, no Ray)",
        metavar="N",
    ))  # fmt: skip
    ray_address: str | None = field(default=None, metadata=option(
        "with --replicas (or --prefill-replicas): join this Ray cluster (host:port, or "
        "'auto') instead of starting one",
        metavar="ADDRESS",
    ))  # fmt: skip
    replica_cpus: float = field(default=1.0, metadata=option(
        "with --replicas (or --prefill-replicas): CPUs each replica reserves from Ray, and "
        "its torch threads (default 1)",
        metavar="N",
    ))  # fmt: skip
    replica_gpus: float | None = field(default=None, metadata=option(
        "with --replicas (or --prefill-replicas): GPUs each replica reserves from Ray "
        "(default: 1 when the engine runs on CUDA, else 0); a fraction below 1 shares a GPU "
        "(0.5: two replicas on one), each replica then held to that share of its memory "
        "with --gpu-memory-utilization",
        metavar="N",
    ))  # fmt: skip
    prefill_replicas: int | None = field(default=None, metadata=option(
        "serve disaggregated on Ray Serve: P replicas compute each prompt's KV and write "
        "its blocks to the shared --kv-remote tier, then a decode replica (--decode-replicas) "
        "loads them and generates (needs --decode-replicas and --kv-remote; not with "
        "--replicas)",
        metavar="P",
    ))  # fmt: skip
    decode_replicas: int | None = field(default=None, metadata=option(
        "with --prefill-replicas: D replicas that load the prompt's blocks from the shared "
        "tier and generate the tokens; the router picks among them",
        metavar="D",
    ))  # fmt: skip
    router: RouterName = field(default="kv-aware", metadata=option(
        "with --replicas: how a request picks its replica: kv-aware (the most cached prefix "
        "blocks against load), least-loaded, round-robin (default kv-aware); disaggregated, "
        "each pool (prefill, decode) is routed this way",
        metavar="NAME",
    ))  # fmt: skip

    @property
    def disaggregated(self) -> bool:
        """Prefill and decode on separate replicas (--prefill-replicas)."""
        return self.prefill_replicas is not None

    @property
    def num_replicas(self) -> int | None:
        """The routed (decode) replicas on Ray Serve; None: one engine, no Ray."""
        return self.decode_replicas if self.disaggregated else self.replicas

    @property
    def api_keys(self) -> list[str]:
        """Every accepted key: --api-key's, then the file's (ValueError if unreadable)."""
        keys = list(self.api_key or ())
        if self.api_key_file is not None:
            keys += read_key_file(self.api_key_file)
        return list(dict.fromkeys(keys))

    def __post_init__(self) -> None:
        check_choices(self)
        if self.max_request_bytes < 1024:
            raise ValueError(f"--max-request-bytes must be >= 1024, got {self.max_request_bytes}")
        if self.shutdown_timeout_s < 0:
            raise ValueError(f"--shutdown-timeout must be >= 0, got {self.shutdown_timeout_s}")
        if self.max_waiting_requests is not None and self.max_waiting_requests < 1:
            raise ValueError(
                f"--max-waiting-requests must be >= 1, got {self.max_waiting_requests}"
            )
        self._check_api_server_count()
        if self.replicas is not None and self.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {self.replicas}")
        if self.replica_cpus <= 0:
            raise ValueError(f"--replica-cpus must be > 0, got {self.replica_cpus}")
        gpus = self.replica_gpus
        if gpus is not None and (gpus < 0 or (gpus > 1 and gpus != int(gpus))):
            raise ValueError(f"--replica-gpus must be a fraction in [0, 1] or a whole "
                             f"number of GPUs, got {gpus:g}")  # fmt: skip
        self._check_disaggregation()
        if self.ray_address is not None and self.num_replicas is None:
            raise ValueError("--ray-address needs --replicas N (or --prefill-replicas P "
                             "--decode-replicas D)")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")

    def _check_api_server_count(self) -> None:
        n = self.api_server_count
        if n < 1:
            raise ValueError(f"--api-server-count must be >= 1, got {n}")
        if n > 1 and self.engine_in_process:
            raise ValueError("--api-server-count N > 1 needs the engine in a process of its "
                             "own: leave out --engine-in-process")  # fmt: skip
        if n > 1 and (self.replicas is not None or self.prefill_replicas is not None):
            raise ValueError("--api-server-count N > 1 serves one engine; with --replicas "
                             "(or --prefill-replicas) leave it out")  # fmt: skip

    def _check_disaggregation(self) -> None:
        p, d = self.prefill_replicas, self.decode_replicas
        if p is None and d is None:
            return
        if p is None or d is None:
            given, missing = ("--prefill-replicas", "--decode-replicas") if d is None else (
                "--decode-replicas", "--prefill-replicas")  # fmt: skip
            raise ValueError(f"{given} needs {missing}: disaggregated serving runs both kinds")
        if self.replicas is not None:
            raise ValueError("--replicas is for co-located serving; with --prefill-replicas "
                             "and --decode-replicas leave it out")  # fmt: skip
        for flag, n in (("--prefill-replicas", p), ("--decode-replicas", d)):
            if n < 1:
                raise ValueError(f"{flag} must be >= 1, got {n}")
