"""Attention backends over the paged KV cache, chosen by name."""

from strata.attention.backend import AttentionBackend, BatchLayout, get_backend

__all__ = ["AttentionBackend", "BatchLayout", "get_backend"]
