"""GPU correctness check: Strata against HF transformers on the same GPU.

1. Tiny random Llama/Qwen2/Mistral configs in float32 through the full engine (Triton
   backend, decode from CUDA graphs, fused ops), and eagerly: greedy tokens must equal HF.
2. random:llama-3.2-1b in bfloat16, same weights in both: greedy tokens compared as the
   length of the common prefix (bf16 rounding may flip a near-tie later on).
3. random:llama-3.2-1b bf16: the Triton engine's logits (graphs, fused ops) against the
   reference engine's (eager, torch ops), prefill and decode rows, same tokens fed.
4. The Triton attention backend against the reference, and its speed (gpu_attention.py).

    python benchmarks/gpu_check.py            # prints tables; exit 1 on a mismatch
    python benchmarks/gpu_check.py --only attention [--sweep]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile

import torch
from gpu_attention import attention_section
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from strata import LLM, SamplingParams
from strata.bench.throughput import load_hf_twin

TINY = {
    "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
    "initializer_range": 0.1,
}  # fmt: skip
PROMPTS = [[5, 17, 300, 42, 7, 99, 250, 3, 11], [400, 8], list(range(30, 67))]


def hf_greedy(model: torch.nn.Module, prompt: list[int], n: int, device: str) -> list[int]:
    with torch.inference_mode():
        ids = torch.tensor([prompt], device=device)
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def model_section() -> bool:
    """Greedy tokens against HF transformers; True when every float32 case matched."""
    device = "cuda"
    rows: list[tuple[str, str, str]] = []
    failed = False
    for name, config in {
        "llama-gqa": LlamaConfig(**TINY),
        "qwen2": Qwen2Config(**TINY),
        "mistral": MistralConfig(**TINY, sliding_window=None),
    }.items():
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
        ref = [hf_greedy(hf.to(device), p, 16, device) for p in PROMPTS]
        for eager, overlap in ((False, "on"), (False, "off"), (True, "on")):
            with tempfile.TemporaryDirectory() as folder:
                hf.save_pretrained(folder)
                llm = LLM(folder, device=device, dtype="float32", kv_cache_memory=0.05,
                          block_size=16, enforce_eager=eager,
                          overlap_scheduling=overlap)  # fmt: skip
            engine = llm.engine
            mode = f"{engine.backend.name}{'+graphs' if engine.runner.graphs else ''}"
            mode += "+overlap" if engine.overlap else ""
            ours = [o.token_ids for o in llm.generate(PROMPTS, params)]
            ok = ours == ref
            failed |= not ok
            rows.append((f"tiny {name} fp32 {mode}", "greedy == HF", "PASS" if ok else "FAIL"))
            llm.check_integrity()

    llm = LLM("random:llama-3.2-1b", device=device, kv_cache_memory=4, max_model_len=4096)
    hf = load_hf_twin(llm)
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    prompts = [[(i * 7919 + j * 104729) % 120000 + 100 for j in range(n)] for i, n in
               enumerate((16, 200, 700, 1500))]  # fmt: skip
    ours = [o.token_ids for o in llm.generate(prompts, params)]
    for prompt, tokens in zip(prompts, ours, strict=True):
        same = common_prefix(tokens, hf_greedy(hf, prompt, 32, device))
        rows.append((f"llama-3.2-1b bf16 prompt {len(prompt)}", "tokens equal to HF", f"{same}/32"))
    llm.check_integrity()

    rows += overlap_rows()
    failed |= any(r[2] == "FAIL" for r in rows)
    rows += logits_rows()
    print(f"\nGPU check on {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'case':<34} {'check':<20} result")
    for case, check, result in rows:
        print(f"{case:<34} {check:<20} {result}")
    return not failed


def overlap_rows() -> list[tuple[str, str, str]]:
    """Overlap scheduling against synchronous steps on the 1B shape: greedy, seeded and
    penalized requests of different lengths, tokens and logprobs equal exactly (the same
    batches run in both)."""
    prompts = [[(i * 7919 + j * 104729) % 120000 + 100 for j in range(n)] for i, n in
               enumerate((16, 200, 700, 1500, 33, 90, 410, 5))]  # fmt: skip
    params = [
        SamplingParams(max_tokens=8 + 7 * i, temperature=0.0 if i % 2 else 0.8, seed=i,
                       ignore_eos=True, frequency_penalty=0.5 * (i % 3), logprobs=i % 3)
        for i in range(len(prompts))
    ]  # fmt: skip
    results = {}
    for overlap in ("off", "on"):
        llm = LLM("random:llama-3.2-1b", device="cuda", kv_cache_memory=4, max_model_len=4096,
                  max_num_batched_tokens=512, overlap_scheduling=overlap)  # fmt: skip
        outs = llm.generate(prompts, params)
        llm.check_integrity()
        results[overlap] = [(o.token_ids, o.logprobs) for o in outs]
        del llm
        torch.cuda.empty_cache()
    same = "PASS" if results["on"] == results["off"] else "FAIL"
    return [("1b bf16 overlap vs sync, 8 reqs", "tokens+logprobs equal", same)]


def recorded_logits(
    llm: LLM, prompts: list[list[int]], steps: int, forced: list[torch.Tensor] | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Logits and tokens of each step; `forced` replaces the sampled tokens step by step,
    so a second engine is fed exactly the first one's tokens."""
    runner = llm.engine.runner
    logits: list[torch.Tensor] = []
    tokens: list[torch.Tensor] = []
    compute, sample = runner.compute_logits, runner.sample

    def record_logits(plan: object, feed: object = None) -> torch.Tensor | None:
        out = compute(plan, feed)  # type: ignore[arg-type]
        if out is not None:
            logits.append(out.clone())
        return out

    def record_tokens(*args: object) -> object:
        out = sample(*args)  # type: ignore[arg-type]
        if out is not None:
            if forced is not None:
                out = dataclasses.replace(out, token_ids=forced[len(tokens)])
            tokens.append(out.token_ids.clone())
        return out

    runner.compute_logits = record_logits  # type: ignore[method-assign]
    runner.sample = record_tokens  # type: ignore[method-assign,assignment]
    try:
        llm.generate(prompts, SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True))
    finally:
        del runner.compute_logits, runner.sample
    return logits, tokens


def logits_rows() -> list[tuple[str, str, str]]:
    """Triton engine (graphs, fused ops) against the reference engine (eager, torch ops),
    fed the same tokens: the reference's greedy choices."""
    prompts = [[(i * 7919 + j * 104729) % 120000 + 100 for j in range(n)] for i, n in
               enumerate((16, 200, 700))]  # fmt: skip
    runs = {}
    forced = None
    for backend in ("reference", "triton"):
        llm = LLM("random:llama-3.2-1b", device="cuda", kv_cache_memory=2, max_model_len=2048,
                  attention_backend=backend, enforce_eager=backend == "reference",
                  max_num_seqs=8)  # fmt: skip
        if backend == "reference":
            llm.engine.loaded.model.set_fused_ops(False)
        runs[backend] = recorded_logits(llm, prompts, 4, forced)
        forced = runs[backend][1]
        del llm
        torch.cuda.empty_cache()
    rows = []
    pairs = zip(runs["triton"][0], runs["reference"][0], strict=True)
    for step, (a, b) in enumerate(pairs):
        diff = (a - b).abs().max().item()
        rel = ((a - b).norm() / b.norm()).item()
        same = (a.argmax(-1) == b.argmax(-1)).sum().item()
        kind = "prefill" if step == 0 else "decode, graph"
        result = f"{diff:.4f} / {rel:.2e}, argmax equal {same}/{len(a)}"
        rows.append((f"1b bf16 triton vs ref, step {step} ({kind})", "max abs / rel L2", result))
    return rows + ops_rows()


def ops_rows() -> list[tuple[str, str, str]]:
    """Each fused kernel against its torch path on fresh random bf16 inputs."""
    from strata.models.rope import RotaryEmbedding
    from strata.ops.activation import silu_and_mul
    from strata.ops.rmsnorm import add_rmsnorm
    from strata.ops.rope_kv import rope_write_kv

    dev, bf16 = "cuda", torch.bfloat16
    rows = []
    x, res = (torch.randn(333, 4096, device=dev, dtype=bf16) for _ in range(2))
    w = torch.rand(4096, device=dev, dtype=bf16) + 0.5
    (y1, s1), (y0, s0) = add_rmsnorm(x, res, w, 1e-5, True), add_rmsnorm(x, res, w, 1e-5, False)
    diffs = f"{(y1 - y0).abs().max().item():.2e} / {(s1 - s0).abs().max().item():.2e}"
    rows.append(("fused add+RMSNorm vs torch", "max abs diff (out / sum)", diffs))
    gu = torch.randn(333, 2 * 14336, device=dev, dtype=bf16)
    d = (silu_and_mul(gu, True) - silu_and_mul(gu, False)).abs().max().item()
    rows.append(("fused SiLU-and-mul vs torch", "max abs diff", f"{d:.2e}"))

    cfg = LlamaConfig(head_dim=128, max_position_embeddings=4096)
    rope = RotaryEmbedding(cfg, 128, 4096).to(dev)
    heads, kvh, tokens, block = 32, 8, 257, 16
    qkv = torch.randn(tokens, (heads + 2 * kvh) * 128, device=dev, dtype=bf16)
    pos = torch.randint(0, 4096, (tokens,), device=dev)
    slots = torch.randperm(64 * block, device=dev)[:tokens]
    slots[::7] = -1
    k_cache, v_cache = (torch.full((64, block, kvh, 128), float("nan"), device=dev, dtype=bf16)
                        for _ in range(2))  # fmt: skip
    q1 = rope_write_kv(qkv, pos, rope.cos, rope.sin, k_cache, v_cache, slots, heads, kvh)
    q, k, v = qkv.split([heads * 128, kvh * 128, kvh * 128], dim=-1)
    q0, k0 = rope(pos, q.reshape(tokens, heads, 128), k.reshape(tokens, kvh, 128))
    live = slots >= 0
    kc, vc = k_cache.view(-1, kvh, 128)[slots[live]], v_cache.view(-1, kvh, 128)[slots[live]]
    dq = (q1 - q0).abs().max().item()
    dk = (kc - k0[live]).abs().max().item()
    dv = (vc - v.reshape(tokens, kvh, 128)[live]).abs().max().item()
    untouched = k_cache.isnan().sum().item() == (64 * block - live.sum().item()) * kvh * 128
    diffs = f"{dq:.2e} / {dk:.2e} / {dv:.2e}, skipped slots untouched: {untouched}"
    rows.append(("fused RoPE+KV write vs torch", "max abs diff q / k / v", diffs))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["models", "attention"], help="run one section")
    parser.add_argument("--sweep", action="store_true", help="also sweep attention tiles")
    args = parser.parse_args()
    ok = True
    if args.only in (None, "models"):
        ok &= model_section()
    if args.only in (None, "attention"):
        ok &= attention_section(sweep=args.sweep)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
