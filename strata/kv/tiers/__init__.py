"""The tiers below the GPU block pool, and what moves blocks between them and the pool.

    base.py          TierStore, the interface; cpu.py, disk.py, remote.py implement it
    manager.py       TierManager: write-through, loads and probes on two threads
    jobs.py          the threads' jobs and reports; lower.py their disk/remote reads, writes
    transfer.py      pool <-> cpu slot copies
    loads.py         TierLoads, what the scheduler asks (load_tracker.py; a no-op without tiers)
    build.py         both, built from a TierConfig
    block_format.py  the stored bytes of a block; store_secret.py authenticates (and
                     optionally encrypts) them; store_url.py shows URLs without passwords
    remote_writer.py the remote tier's SETs in a process of their own (its child:
                     remote_writer_child.py), off the engine's GIL
"""
