"""GPU correctness check: Strata against HF transformers on the same GPU.

1. Tiny random Llama/Qwen2/Mistral configs in float32: greedy tokens must be equal.
2. random:llama-3.2-1b in bfloat16, same weights in both: greedy tokens compared as the
   length of the common prefix (bf16 rounding may flip a near-tie later on).
3. The Triton attention backend against the reference, and its speed (gpu_attention.py).

    python benchmarks/gpu_check.py            # prints tables; exit 1 on a mismatch
    python benchmarks/gpu_check.py --only attention [--sweep]
"""

from __future__ import annotations

import argparse
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
        with tempfile.TemporaryDirectory() as folder:
            hf.save_pretrained(folder)
            llm = LLM(folder, device=device, dtype="float32", kv_cache_memory=0.05, block_size=16)
        hf = hf.to(device)
        params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
        ours = [o.token_ids for o in llm.generate(PROMPTS, params)]
        ref = [hf_greedy(hf, p, 16, device) for p in PROMPTS]
        ok = ours == ref
        failed |= not ok
        rows.append((f"tiny {name} fp32", "greedy == HF", "PASS" if ok else "FAIL"))
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

    print(f"\nGPU check on {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'case':<34} {'check':<20} result")
    for case, check, result in rows:
        print(f"{case:<34} {check:<20} {result}")
    return not failed


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
