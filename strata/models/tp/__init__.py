"""Tensor-parallel sharding of the Llama-family models (Megatron-style, see layout.py)."""
