"""A trace-driven simulator of many engine replicas behind one routing front (issue 24).

    workload ─► front ──(the real routers: strata/server/replicas/routers.py)──► replica i
    (arrivals,    │  in flight, KV use and prefix blocks per replica             │ continuous
     prompts as   │                                                              │ batching,
     block keys)  └───────── finished / first token ◄──────── step ends ◄────────┘ LRU blocks

Each replica is a continuous-batching engine whose step takes the time a cost model
fitted from a real replica's measured steps gives it (costs.py); its prefix cache is a
fixed number of blocks with LRU eviction (block_cache.py). With a prefill/decode split,
prefill replicas hand each request's KV to a decode replica for a cost per block.
"""
