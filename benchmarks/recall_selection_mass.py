"""How much of the attention each recall policy's picks hold (issue 17): the share of the
middle's true attention mass in the blocks a policy picks, against the most any pick of
as many blocks holds.

On RULER samples (the embedded model, float32, teacher-forced through transformers), at
the decode steps that write the answer (the prompt's last token, then each reference
token), in every sparse layer (the first DENSE are dense, as the engine's default):

    mass(h, b)    query head h's softmax over every key so far, summed over block b
    held(p)       sum over the blocks policy p picks for h's KV head of mass(h, b), over
                  the middle's mass (sink block and the last TAIL_BLOCKS left out, as the
                  engine keeps them on the GPU), averaged over heads, steps and layers
    oracle        the blocks of the largest mass, the most of the group's heads

Each policy is fitted to the middle at the prompt's end by its own code (take_all_keys,
summarize) and scores with its own `scores`: quest, shadowkv (8- and 4-token landmarks),
clusterkv and pqcache, each block scored by its best token (as before) and by its
tokens' summed share, the block's estimated attention mass (`block_mass`). The picks are
k = length x budget / 16 blocks, as the engine's budget counts them.

    PYTHONPATH=. python benchmarks/recall_selection_mass.py [--length 4096]
        [--budgets 0.0625,0.03125] [--tasks niah_single_2,niah_multikey_1] [--samples 2]
        [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recall_layer_prediction import layer_tensors, load

from strata.eval.prompt import prompt_ids, template_parts
from strata.eval.tasks import generate_samples
from strata.kv.recall.clusterkv import ClusterKVPolicy
from strata.kv.recall.policy import RecallPolicy, SummaryRoom
from strata.kv.recall.pqcache import PQCachePolicy
from strata.kv.recall.quest import QuestPolicy
from strata.kv.recall.shadowkv import ShadowKVPolicy

BLOCK = 16
DENSE = 2
TAIL_BLOCKS = 2  # the window (32 tokens) and the open block stay on the GPU

# name -> (policy class, attributes set on the instance, landmark tokens)
POLICIES: dict[str, tuple[type[RecallPolicy], dict[str, Any], int]] = {
    "quest": (QuestPolicy, {}, 8),
    "shadowkv": (ShadowKVPolicy, {}, 8),
    "shadowkv4": (ShadowKVPolicy, {}, 4),
    "clusterkv (best token)": (ClusterKVPolicy, {"block_mass": False}, 8),
    "clusterkv (block mass)": (ClusterKVPolicy, {"block_mass": True}, 8),
    "pqcache (best token)": (PQCachePolicy, {"block_mass": False}, 8),
    "pqcache (block mass)": (PQCachePolicy, {"block_mass": True}, 8),
}


def fitted(name: str, keys: torch.Tensor, slots: int, rope: Any) -> RecallPolicy:
    """Policy `name` fitted to the middle blocks' post-RoPE keys [kv_heads, n, bs, dim]
    (rope: the model's tables, as strata.attention.layer_inputs.Rotary)."""
    cls, attrs, landmarks = POLICIES[name]
    kvh, n, bs, d = keys.shape
    room = SummaryRoom(1, kvh, n, d, bs, torch.float32, slots=slots, landmark_tokens=landmarks)
    policy = cls()
    for key, value in attrs.items():
        setattr(policy, key, value)
    policy.allocate(room, rope, None)
    policy.summarize(0, 0, keys)
    if policy.wants_all_keys(0):
        policy.take_all_keys(0, keys)
    return policy


def held_share(mass: torch.Tensor, picks: torch.Tensor) -> float:
    """mass [heads, blocks] of the middle; picks [kv_heads, k] block ids: the picked share
    of each head's middle mass, averaged over heads."""
    group = mass.shape[0] // picks.shape[0]
    held = mass.gather(1, picks.repeat_interleave(group, dim=0)).sum(1)
    return float((held / mass.sum(1).clamp(min=1e-30)).mean())


def step_masses(q: torch.Tensor, k: torch.Tensor, t: int, middle: int) -> torch.Tensor:
    """[heads, middle]: each query head's attention (query at position t, q [H, D]) summed
    over middle blocks 1..middle."""
    kvh, d = k.shape[0], k.shape[-1]
    group = q.shape[0] // kvh
    keys = k[:, : t + 1].repeat_interleave(group, dim=0)  # [H, t + 1, D]
    probs = (torch.einsum("hd,htd->ht", q, keys) / d**0.5).softmax(-1)
    return probs[:, BLOCK : (middle + 1) * BLOCK].reshape(q.shape[0], middle, BLOCK).sum(-1)


def measure_sample(
    layers: list[dict[str, torch.Tensor]], start: int, steps: int, budgets: list[float],
    length: int, rope: Any,
) -> dict[tuple[str, float], list[float]]:  # fmt: skip
    """Held shares per (policy, budget), one value per sparse layer and step."""
    out: dict[tuple[str, float], list[float]] = {}
    middle = start // BLOCK - 1 - TAIL_BLOCKS  # middle blocks 1..middle at the prompt's end
    for li in range(DENSE, len(layers)):
        k, q = layers[li]["k"], layers[li]["q"]
        kvh, _, d = k.shape
        keys = k[:, BLOCK : (middle + 1) * BLOCK].reshape(kvh, middle, BLOCK, d)
        for budget in budgets:
            slots = max(1, int(length * budget / BLOCK))
            policies = {name: fitted(name, keys, slots, rope) for name in POLICIES}
            for j in range(steps):
                mass = step_masses(q[:, j], k, start + j, middle)
                group = mass.shape[0] // kvh
                oracle = mass.view(kvh, group, middle).amax(1).topk(slots, dim=-1).indices
                out.setdefault(("oracle", budget), []).append(held_share(mass, oracle))
                qg = q[:, j].view(kvh, group, d)
                for name, policy in policies.items():
                    picks = policy.scores(0, qg, middle).topk(slots, dim=-1).indices
                    out.setdefault((name, budget), []).append(held_share(mass, picks))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=4096, help="tokens per sample")
    p.add_argument("--budgets", default="0.0625,0.03125", help="comma-separated budgets")
    p.add_argument("--tasks", default="niah_single_2,niah_multikey_1",
                   help="comma-separated RULER tasks")
    p.add_argument("--samples", type=int, default=2, help="samples per task")
    p.add_argument("--json", type=Path, help="write the results here")
    a = p.parse_args()
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    hf, tokenizer = load("embedded")
    parts = template_parts(tokenizer)
    budgets = [float(b) for b in a.budgets.split(",")]
    held: dict[tuple[str, float], list[float]] = {}
    samples = [s for task in a.tasks.split(",")
               for s in generate_samples(tokenizer, task, a.length, a.samples)]  # fmt: skip
    for sample in tqdm(samples, desc="samples"):
        ids = prompt_ids(tokenizer, sample, parts).all
        answer = tokenizer.encode(sample.references[0], add_special_tokens=False)
        full = torch.tensor(ids + answer)
        steps = len(answer)  # the query at the prompt's last token, then each answer token
        layers = layer_tensors(hf, full, steps + 1)
        cos, sin = hf.model.rotary_emb(torch.zeros(1), torch.arange(full.numel())[None])
        rope = SimpleNamespace(cos=cos[0], sin=sin[0])
        for key, values in measure_sample(layers, len(ids) - 1, steps, budgets, a.length,
                                          rope).items():  # fmt: skip
            held.setdefault(key, []).extend(values)
    names = ["oracle", *POLICIES]
    print(f"{'policy':<26}" + "".join(f"{f'budget {b:g}':>16}" for b in budgets))
    for name in names:
        print(f"{name:<26}" + "".join(f"{statistics.fmean(held[(name, b)]):>16.1%}"
                                      for b in budgets))  # fmt: skip
    if a.json is not None:
        rows = [{"policy": n, "budget": b, "held_share": statistics.fmean(held[(n, b)]),
                 "values": len(held[(n, b)])} for n in names for b in budgets]  # fmt: skip
        meta = {"model": "embedded SmolLM2-135M-Instruct, float32", "length": a.length,
                "tasks": a.tasks, "samples_per_task": a.samples}  # fmt: skip
        a.json.write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
