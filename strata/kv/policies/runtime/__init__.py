"""The KV-policy runtime: what the engine, scheduler and runner ask of KV policies.

driver.py          KVPolicyDriver (the engine asks it): attach a policy to a request,
                   compact after the steps that reach a compression point or cap
sequence_kv.py     SequenceKV (the scheduler asks it): one sequence's slots
step_kv.py         KVStepBuilder (the runner asks it): a step's slots, per-layer
                   layouts (budgets, attended blocks) and observer
observer.py        StepObserver: each layer's queries to the policies that asked
compaction.py      a keep mask applied to a sequence's blocks
reconstruction.py  extra prefill passes at the compression point (KVzip)
interfaces.py      what the runtime reads of the engine's sequences and steps
"""
