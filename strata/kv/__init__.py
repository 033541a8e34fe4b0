"""The KV cache: a content-addressed store of fixed-size blocks; the GPU pool caches it."""
