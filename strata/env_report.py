"""`strata env`: the facts a bug report needs, gathered without side effects.

Versions of Strata and the libraries it runs on, the device and its memory, whether
a Valkey/Redis server answers, and whether the installed packages match the lock
this checkout installs from (requirements/*.lock, see install.sh).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

LIBRARIES = (
    "torch",
    "transformers",
    "triton",
    "safetensors",
    "gguf",
    "fastapi",
    "uvicorn",
    "redis",
    "numpy",
)
LOCK_PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)")


@dataclass(frozen=True)
class Fact:
    name: str
    value: str


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.1f} GiB"


def device_facts() -> list[Fact]:
    try:
        import torch
    except ImportError:
        return [Fact("device", "unknown (torch does not import)")]
    facts = [Fact("CUDA (torch build)", torch.version.cuda or "none (CPU build)")]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            free, total = torch.cuda.mem_get_info(index)
            facts.append(
                Fact(f"cuda:{index}", f"{props.name}, {_gib(total)} ({_gib(free)} free)")
            )
    else:
        facts.append(Fact("device", "cpu (no CUDA device visible)"))
    facts.append(Fact("CPU cores", str(os.cpu_count())))
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        facts.append(Fact("RAM", _gib(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))))
    return facts


def kv_server_facts(url: str, timeout_s: float = 0.3) -> list[Fact]:
    """Which server binaries are on PATH, and whether `url` answers PING (the URL shown
    without its password)."""
    from strata.kv.tiers.store_url import redact_url, redis_url

    shown = redact_url(url)
    binaries = [b for b in ("valkey-server", "redis-server") if shutil.which(b)]
    facts = [Fact("KV server binaries", ", ".join(binaries) or "none on PATH")]
    try:
        import redis

        client = redis.Redis.from_url(
            redis_url(url), socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        info = client.info("server")
        server = "valkey" if "valkey_version" in info else "redis"
        version = info.get("valkey_version") or info.get("redis_version")
        facts.append(Fact(f"KV server at {shown}", f"{server} {version}"))
    except Exception as e:  # any failure means "not reachable", which is the answer
        facts.append(Fact(f"KV server at {shown}", f"not reachable ({type(e).__name__})"))
    return facts


def lock_facts(checkout: Path) -> list[Fact]:
    """How the installed packages differ from the checkout's locks, if it has them."""
    facts = []
    for lock in sorted((checkout / "requirements").glob("*.lock")):
        pins = [m.groups() for line in lock.read_text().splitlines() if (m := LOCK_PIN.match(line))]
        differ = [
            f"{name} {package_version(name)} (lock {version})"
            for name, version in pins
            if package_version(name) != version
        ]
        summary = f"matches all {len(pins)} pins" if not differ else (
            f"{len(differ)} of {len(pins)} differ: " + ", ".join(differ[:6])
            + (", ..." if len(differ) > 6 else "")
        )
        facts.append(Fact(f"lock {lock.name}", summary))
    return facts


def gather(kv_url: str) -> list[Fact]:
    import strata

    checkout = Path(strata.__file__).resolve().parent.parent
    facts = [
        Fact("strata", f"{strata.__version__} ({checkout})"),
        Fact("python", f"{platform.python_implementation()} {sys.version.split()[0]}"),
        Fact("platform", f"{platform.system()} {platform.release()} {platform.machine()}"),
    ]
    facts += [Fact(name, package_version(name)) for name in LIBRARIES]
    facts += device_facts()
    facts += kv_server_facts(kv_url)
    facts += lock_facts(checkout)
    return facts


def render(facts: list[Fact]) -> str:
    width = max(len(f.name) for f in facts)
    return "\n".join(f"{f.name:<{width}}  {f.value}" for f in facts)
