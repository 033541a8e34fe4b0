"""Synthetic offline workloads: random prompts and output lengths from a fixed seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_input_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def parse_range(text: str) -> tuple[int, int]:
    """'100-1024' or '128' -> (low, high), inclusive; both >= 1."""
    parts = text.split("-") if "-" in text else [text, text]
    try:
        low, high = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"expected a length or a range LOW-HIGH, got {text!r}") from None
    if not 1 <= low <= high:
        raise ValueError(f"expected 1 <= LOW <= HIGH, got {text!r}")
    return low, high


def random_workload(
    num_requests: int,
    input_range: tuple[int, int],
    output_range: tuple[int, int],
    vocab_size: int,
    seed: int,
) -> Workload:
    """Prompts of uniform random length and random token ids (avoiding the first 100
    ids, where tokenizers keep special tokens)."""
    rng = np.random.default_rng(seed)
    in_lens = rng.integers(input_range[0], input_range[1] + 1, num_requests)
    out_lens = rng.integers(output_range[0], output_range[1] + 1, num_requests)
    low = min(100, vocab_size - 1)
    prompts = [rng.integers(low, vocab_size, int(n)).tolist() for n in in_lens]
    return Workload(prompts, [int(n) for n in out_lens])
