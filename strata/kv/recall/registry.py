"""Recall policies by name (policy.py): they keep every block and pick per step."""

from __future__ import annotations

from strata.kv.recall.policy import RecallPolicy
from strata.registry import Registry

RECALL_POLICIES: Registry[type[RecallPolicy]] = Registry("kv_policy", {
    "quest": "strata.kv.recall.quest:QuestPolicy",
    "shadowkv": "strata.kv.recall.shadowkv:ShadowKVPolicy",
    "clusterkv": "strata.kv.recall.clusterkv:ClusterKVPolicy",
    "pqcache": "strata.kv.recall.pqcache:PQCachePolicy",
    "magicpig": "strata.kv.recall.magicpig:MagicPIGPolicy",
    "full_offload": "strata.kv.recall.policy:FullOffloadPolicy",
})  # fmt: skip


def is_recall_policy(name: str) -> bool:
    return name in RECALL_POLICIES.names()
