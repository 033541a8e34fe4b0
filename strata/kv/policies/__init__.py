"""KV policies: one file each behind `KVPolicy` (base.py), chosen by name (registry.py);
the scored ones share `ScoredPolicy` (scored.py). runtime/ drives them: per-sequence
state, each step's slots and observer, compaction and reconstruction passes."""
