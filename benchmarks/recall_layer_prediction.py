"""How well a layer's input predicts the next layer's recall picks (cross-layer prefetch,
issue 17), against what a working set already reuses: the same layer's picks one step
earlier.

For the last --steps positions t of a prompt (teacher-forced, each a decode step over the
keys before it) and each layer l >= 1, per KV head:

    picks(l, t)      top-k blocks by the true query q_l(t) = RoPE(Wq_l norm_l(h_l(t)))
    predicted(l, t)  top-k blocks by q_l applied to layer l-1's input:
                     RoPE(Wq_l norm_l(h_{l-1}(t)))  (InfiniGen's idea: the residual stream
                     changes little from one layer to the next, so the fetch for layer l
                     can start while layer l-1 runs)
    previous(l, t)   picks(l, t - 1): what a working set of k slots holds at step t

and reports, per layer and averaged, the share of picks(l, t) in predicted (the
prediction's precision, equal to its recall at equal k), in previous (the working set's
hit rate), and in their union (a working set of 2k slots after a prefetch).

Blocks are scored two ways: "mass" (each block's attention probability, summed over its
tokens, the most of its GQA group's heads: what an ideal selection picks) and "quest"
(Quest's bound, sum over d of max(q_d max_d, q_d min_d) over the block's keys, the most
over the group). The first block (the sink) and the current one (the tail) are never
picked; k = the middle blocks x --budget.

    python benchmarks/recall_layer_prediction.py [--model embedded|random:llama-3.2-1b]
        [--context 2048] [--steps 16] [--budget 0.0625] [--prompt docs|random] [--json F]

Runs on the CPU in float32, one forward of the prompt through transformers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

BLOCK = 16
DOCS = Path(__file__).resolve().parent.parent / "docs"


def load(model: str, seed: int = 0) -> tuple[Any, Any]:
    """The transformers model (float32, eval) and its tokenizer (None for random shapes)."""
    if model == "embedded":
        from strata.models.embedded import embedded_model_path
        from strata.models.loader import gguf_to_folder

        folder = gguf_to_folder(embedded_model_path())
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        return hf.eval(), AutoTokenizer.from_pretrained(folder)
    from strata.models.presets import random_config_dict

    raw = random_config_dict(model.removeprefix("random:"))
    config = AutoConfig.for_model(**raw)
    torch.manual_seed(seed)  # transformers' init: normal(0, 0.02), as the engine's random:
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval(), None


def prompt(tokenizer: Any, vocab: int, context: int, kind: str) -> torch.Tensor:
    if kind == "random" or tokenizer is None:
        g = torch.Generator().manual_seed(0)
        return torch.randint(1000, min(vocab, 100000), (context,), generator=g)
    text = "\n\n".join(p.read_text() for p in sorted(DOCS.glob("*.md")))
    return torch.tensor(tokenizer.encode(text)[:context])


def project(layer: Any, h: torch.Tensor, proj: Any) -> torch.Tensor:
    """[1, heads, T, D]: `proj` (the layer's q_proj or k_proj) of its input norm of h."""
    x = proj(layer.input_layernorm(h))
    return x.view(1, x.shape[1], -1, layer.self_attn.head_dim).transpose(1, 2)


@torch.no_grad()
def layer_tensors(hf: Any, ids: torch.Tensor, last: int) -> list[dict[str, torch.Tensor]]:
    """Per layer: post-RoPE keys [KVH, T, D] and the queries [H, last, D] of the last `last`
    positions, true (from the layer's own input) and predicted (from the layer before's)."""
    out = hf(ids[None], output_hidden_states=True, use_cache=False)
    stream = out.hidden_states  # stream[l]: the input of layer l
    positions = torch.arange(ids.numel())[None]
    cos, sin = hf.model.rotary_emb(stream[0], positions)
    layers = []
    for i, layer in enumerate(hf.model.layers):
        q = project(layer, stream[i], layer.self_attn.q_proj)
        k = project(layer, stream[i], layer.self_attn.k_proj)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        entry = {"k": k[0], "q": q[0, :, -last:]}
        if i > 0:
            guess = project(layer, stream[i - 1][:, -last:], layer.self_attn.q_proj)
            rotated, _ = apply_rotary_pos_emb(guess, guess, cos[:, -last:], sin[:, -last:])
            entry["guess"] = rotated[0]
        layers.append(entry)
    return layers


def block_scores(q: torch.Tensor, k: torch.Tensor, t: int, how: str) -> torch.Tensor:
    """[KVH, middle blocks]: scores of blocks 1 .. (t // BLOCK) - 1 for the query at t
    (q [H, D]) over keys k [KVH, >t, D]."""
    kvh, d = k.shape[0], k.shape[-1]
    group = q.shape[0] // kvh
    blocks = t // BLOCK
    keys = k[:, : blocks * BLOCK].view(kvh, blocks, BLOCK, d)
    qg = q.view(kvh, group, d)
    if how == "mass":
        logits = torch.einsum("hgd,hnd->hgn", qg, k[:, : t + 1]) / d**0.5
        probs = logits.softmax(-1)[..., : blocks * BLOCK].view(kvh, group, blocks, BLOCK)
        scores = probs.sum(-1)
    else:
        hi, lo = keys.amax(2), keys.amin(2)  # [KVH, blocks, D]
        prod = torch.maximum(qg[:, :, None] * hi[:, None], qg[:, :, None] * lo[:, None])
        scores = prod.sum(-1)
    return scores.amax(1)[:, 1:-1] if blocks > 2 else scores.amax(1)[:, :0]


def picks(scores: torch.Tensor, k: int) -> list[set[int]]:
    return [set(row.topk(k).indices.tolist()) for row in scores]


def share(truth: list[set[int]], held: list[set[int]]) -> float:
    return statistics.fmean(len(a & b) / len(a) for a, b in zip(truth, held, strict=True))


def measure(layers: list[dict[str, torch.Tensor]], context: int, steps: int, budget: float,
            how: str) -> list[dict[str, float]]:  # fmt: skip
    rows = []
    for li in range(1, len(layers)):
        x = layers[li]
        cross, reuse, both = [], [], []
        for j in range(1, steps):
            t = context - steps + j
            true_scores = block_scores(x["q"][:, j], x["k"], t, how)
            k = max(1, int(true_scores.shape[-1] * budget))
            truth = picks(true_scores, k)
            guess = picks(block_scores(x["guess"][:, j], x["k"], t, how), k)
            prev = picks(block_scores(x["q"][:, j - 1], x["k"], t - 1, how), k)
            cross.append(share(truth, guess))
            reuse.append(share(truth, prev))
            both.append(share(truth, [a | b for a, b in zip(guess, prev, strict=True)]))
        rows.append({"layer": li, "scoring": how, "predicted": statistics.fmean(cross),
                     "previous_step": statistics.fmean(reuse),
                     "union": statistics.fmean(both)})  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded",
                   help="embedded (real weights) or random:PRESET (e.g. random:llama-3.2-1b)")
    p.add_argument("--context", type=int, default=2048, help="prompt tokens")
    p.add_argument("--steps", type=int, default=16, help="last positions taken as decode steps")
    p.add_argument("--budget", type=float, default=0.0625, help="picked share of middle blocks")
    p.add_argument("--prompt", choices=("docs", "random"), default="docs",
                   help="docs: this repository's docs; random: uniform token ids")
    p.add_argument("--json", default=None, help="write the rows here")
    a = p.parse_args()
    torch.set_grad_enabled(False)
    hf, tokenizer = load(a.model)
    ids = prompt(tokenizer, hf.config.vocab_size, a.context, a.prompt)
    print(f"{a.model}: {len(hf.model.layers)} layers, {ids.numel()} tokens", file=sys.stderr)
    layers = layer_tensors(hf, ids, a.steps)
    rows = []
    for how in tqdm(("mass", "quest"), desc="scoring"):
        rows += measure(layers, ids.numel(), a.steps, a.budget, how)
    print(f"{'scoring':<8}{'layer':>6}{'predicted':>11}{'prev step':>11}{'union':>8}")
    for how in ("mass", "quest"):
        mine = [r for r in rows if r["scoring"] == how]
        for r in mine:
            print(f"{how:<8}{r['layer']:>6}{r['predicted']:>11.1%}{r['previous_step']:>11.1%}"
                  f"{r['union']:>8.1%}")  # fmt: skip
        mean = {key: statistics.fmean(r[key] for r in mine)
                for key in ("predicted", "previous_step", "union")}  # fmt: skip
        print(f"{how:<8}{'mean':>6}{mean['predicted']:>11.1%}{mean['previous_step']:>11.1%}"
              f"{mean['union']:>8.1%}")  # fmt: skip
    if a.json:
        meta = {"model": a.model, "context": ids.numel(), "steps": a.steps,
                "budget": a.budget, "prompt": a.prompt}  # fmt: skip
        Path(a.json).write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
