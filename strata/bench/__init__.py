"""Benchmarks: offline throughput (against HF transformers), more to come."""
