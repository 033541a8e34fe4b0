"""KV eviction policies: one file each behind `KVPolicy` (base.py), chosen by name
(registry.py)."""
