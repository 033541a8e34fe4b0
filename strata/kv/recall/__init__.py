"""The recall store: sequences whose KV is larger than the GPU (geometry.py has the map).

Every block of a recall sequence lives in pinned host memory (host_store.py); the GPU
keeps the sink, the recent window and open block, the dense layers, the policy's
summaries (policy.py, quest.py) and a working set of recalled blocks (working_set.py).
Each decode step, per sparse layer and KV head, the policy picks the blocks to attend;
misses are fetched from the host on the device's own say (rows.py), with no host sync.
Requests whose prompts start alike share those blocks in the store (prefix_sharing.py).
"""
