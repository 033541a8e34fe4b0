"""Tensor parallelism: worker processes, the step channel, and rank 0's side of them."""
