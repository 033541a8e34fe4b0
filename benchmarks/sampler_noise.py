"""The sampler's noise on the GPU: the fused Triton kernel against the torch hash.

    python benchmarks/sampler_noise.py [--rows 256] [--vocab 128256]

Checks that both give the same bits, then times each (CUDA events, median of 50) and the
whole sampled step (temperature 0.8, every row seeded) with the kernel.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from strata.engine.sampler import Sampler, SamplingBatch, uniform_noise, uniform_noise_torch


def _median_ms(fn: object, repeat: int = 50) -> float:
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()  # type: ignore[operator]
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=256, help="sampling rows (default 256)")
    p.add_argument("--vocab", type=int, default=128256, help="vocabulary (default 128256)")
    args = p.parse_args()
    rows, vocab = args.rows, args.vocab
    seed = torch.randint(0, 2**32, (rows,), dtype=torch.int64, device="cuda")
    step = torch.randint(0, 4096, (rows,), dtype=torch.int64, device="cuda")
    same = torch.equal(
        uniform_noise(seed, step, vocab).view(torch.int32),
        uniform_noise_torch(seed, step, vocab).view(torch.int32),
    )
    print(f"fused == torch, bit for bit: {'PASS' if same else 'FAIL'}")
    torch_ms = _median_ms(lambda: uniform_noise_torch(seed, step, vocab))
    fused_ms = _median_ms(lambda: uniform_noise(seed, step, vocab))
    logits = torch.randn(rows, vocab, device="cuda")
    batch = SamplingBatch(
        temperature=torch.full((rows,), 0.8, device="cuda"),
        top_p=torch.ones(rows, device="cuda"),
        top_k=torch.zeros(rows, dtype=torch.int64, device="cuda"),
        seed=seed,
        step=step,
        all_greedy=False,
        any_top_p_or_k=False,
        max_logprobs=-1,
    )
    sampler = Sampler()
    step_ms = _median_ms(lambda: sampler(logits, batch))
    gb = rows * vocab * 4 / 1e9
    print(f"{torch.cuda.get_device_name()}, {rows} rows x {vocab} tokens")
    print("| what | ms | output GB/s |")
    print("|---|---|---|")
    print(f"| noise, torch (int64 passes) | {torch_ms:.3f} | {gb / torch_ms * 1e3:.0f} |")
    print(f"| noise, fused kernel | {fused_ms:.3f} | {gb / fused_ms * 1e3:.0f} |")
    print(f"| whole sampler call (temperature 0.8, seeded) | {step_ms:.3f} | |")


if __name__ == "__main__":
    main()
