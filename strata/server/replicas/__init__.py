"""`strata serve --replicas N`: engine replicas on Ray Serve behind one HTTP front.

    client ─► front (this process: FastAPI) ─► router picks ─► replica i (Ray Serve)
                 │  prompt → block keys              │          engine + the usual app
                 └──── index of each replica's keys ◄┘ stored/evicted events

Everything here imports Ray lazily: the package loads without the ray extra.
"""
