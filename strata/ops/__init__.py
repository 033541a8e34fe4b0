"""Fused elementwise kernels (Triton on CUDA) with torch fallbacks of identical math."""
