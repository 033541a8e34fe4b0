"""KV policies by name. `full` is lossless (no policy object at all: zero cost).

Each entry maps a name to "module:Class", imported on first use so that validating a
request's policy name does not import torch-heavy modules. Add a policy by adding a
line here and a file beside this one.
"""

from __future__ import annotations

from strata.kv.policies.base import AttentionShape, KVPolicy
from strata.kv.recall.registry import RECALL_POLICIES
from strata.registry import Registry

FULL = "full"

POLICIES: Registry[type[KVPolicy]] = Registry("kv_policy", {
    "streaming": "strata.kv.policies.streaming:StreamingPolicy",
    "h2o": "strata.kv.policies.h2o:H2OPolicy",
    "snapkv": "strata.kv.policies.snapkv:SnapKVPolicy",
    "pyramidkv": "strata.kv.policies.pyramidkv:PyramidKVPolicy",
    "chunkkv": "strata.kv.policies.chunkkv:ChunkKVPolicy",
    "tova": "strata.kv.policies.tova:TOVAPolicy",
    "treekv": "strata.kv.policies.treekv:TreeKVPolicy",
    "expected_attention": "strata.kv.policies.expected_attention:ExpectedAttentionPolicy",
    "kvzip": "strata.kv.policies.kvzip:KVzipPolicy",
})  # fmt: skip


def policy_names() -> tuple[str, ...]:
    """Every valid `kv_policy` value, `full` first, then eviction and recall policies."""
    return (FULL, *POLICIES.names(), *RECALL_POLICIES.names())


def check_policy_name(name: str) -> None:
    """Raise ValueError naming the valid policies unless `name` is one."""
    if name not in policy_names():
        raise ValueError(f"unknown kv_policy {name!r}; valid: {', '.join(policy_names())}")


def create_policy(name: str, shape: AttentionShape) -> KVPolicy:
    """A fresh instance of the policy `name` (not `full`) for one sequence."""
    check_policy_name(name)
    if name == FULL:
        raise ValueError("kv_policy 'full' has no policy object: the sequence keeps every token")
    if name in RECALL_POLICIES:
        raise ValueError(f"kv_policy {name!r} is a recall policy: the recall store runs it")
    return POLICIES.get(name)(shape)

