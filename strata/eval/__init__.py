"""Quality evaluation: RULER-style synthetic tasks and perplexity under a KV policy."""
