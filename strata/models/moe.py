"""Mixture-of-Experts decoders: Mixtral, OLMoE, Qwen2-MoE (shared expert) and Qwen3-MoE.

They are Llama-family decoders (llama.py) whose MLP, in the layers of
`ModelConfig.moe_layers`, is a `SparseMoeBlock`:

    x ─► router.select(x) ─► (topk_ids, topk_weights) ─► routed.forward(layer, x, ...) ─┐
    └──► sigmoid(shared_expert_gate(x)) * shared_expert(x)   (Qwen2-MoE) ──────────────── + ─► y

The router and shared expert are parameters of the module, on the model's device. The
routed experts are not: they are stacked per layer in `ExpertWeights` (wherever the
loader put them) and computed by the model's `RoutedExperts` object (routed_experts.py),
which `set_routed_experts` swaps.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from strata.config import ModelConfig
from strata.models.llama import MLP, LlamaModel
from strata.models.routed_experts import ExpertWeights, RoutedExperts


class Router(nn.Module):
    """Top-k routing exactly as transformers computes it for all four families: softmax
    over every expert in float32, top-k, then (norm_topk_prob; always for Mixtral) the
    k probabilities renormalised to sum to 1. Weights come back in the logits' dtype,
    except Mixtral's, which stay float32."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.renormalize = cfg.norm_topk_prob
        self.float32_weights = cfg.model_type == "mixtral"
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits [T, E]."""
        return F.linear(x, self.weight)

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_ids [T, k] int64, topk_weights [T, k]) for x [T, H]."""
        logits = self(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.float32_weights:
            weights = weights.to(logits.dtype)
        return ids, weights


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.router = Router(cfg)
        self.shared_expert: MLP | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.routed: RoutedExperts | None = None  # set by MoeModel.set_routed_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routed = self.routed
        if routed is None:
            raise RuntimeError("MoE model has no routed experts: call set_routed_experts first")
        routed.prefetch(self.layer_index, x)
        ids, weights = self.router.select(x)
        out = routed.forward(self.layer_index, x, ids, weights)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


# A routed expert's tensor in a checkpoint, after "model." is stripped: per expert
# (layers.3.mlp.experts.5.gate_proj.weight; Mixtral: block_sparse_moe ... w1/w3/w2), or
# stacked as transformers holds them in memory (layers.3.mlp.experts.gate_up_proj).
_EXPERT_TENSOR = re.compile(
    r"layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\."
    r"(?:(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight|(gate_up_proj|down_proj))$"
)
_MIXTRAL_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


class MoeModel(LlamaModel):
    """A Llama-family decoder with MoE layers; routed experts live outside the module."""

    HF_RENAMES = ((".mlp.router.", ".mlp.gate."),)
    # Grouping tokens by expert reads the counts on the host (see ResidentExperts).
    supports_cuda_graphs = False

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__(cfg, max_positions)
        self.expert_weights: list[ExpertWeights] = []

    def make_mlp(self, cfg: ModelConfig, layer_index: int) -> nn.Module:
        if layer_index in cfg.moe_layers:
            return SparseMoeBlock(cfg, layer_index)
        return super().make_mlp(cfg, layer_index)

    def moe_blocks(self) -> list[SparseMoeBlock]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, SparseMoeBlock)]

    def set_routed_experts(self, routed: RoutedExperts) -> None:
        """Every MoE block computes its routed experts with `routed` from now on."""
        if isinstance(routed, nn.Module):
            raise TypeError("RoutedExperts must be a plain object, not an nn.Module")
        for block in self.moe_blocks():
            block.routed = routed

    def allocate_experts(self, device: torch.device, dtype: torch.dtype, pin: bool) -> None:
        """Uninitialised stacked expert weights for every MoE layer on `device`."""
        cfg = self.config
        self.expert_weights = [
            ExpertWeights.empty(
                i, cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, dtype, device, pin
            )
            for i in cfg.moe_layers
        ]

    def _expert_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for w in self.expert_weights:
            yield f"model.layers.{w.layer}.mlp.experts.gate_up_proj", w.gate_up
            yield f"model.layers.{w.layer}.mlp.experts.down_proj", w.down

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        return super().named_weights() + list(self._expert_tensors())

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.dense_hf_state_dict(), **dict(self._expert_tensors())}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Dense tensors go to the module (LlamaModel.load_weights), routed experts into
        `expert_weights` (per-expert or stacked names); checks every expert was set."""
        by_layer = {w.layer: w for w in self.expert_weights}
        seen: set[tuple[int, str, int]] = set()  # (layer, gate_proj/up_proj/down_proj, expert)

        def dense() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                match = _EXPERT_TENSOR.search(name)
                if match is None:
                    yield name.replace(".block_sparse_moe.", ".mlp."), tensor
                    continue
                layer = int(match[1])
                if layer not in by_layer:
                    raise KeyError(f"unexpected weight {name!r}: layer {layer} has no experts")
                w = by_layer[layer]
                expert = None if match[2] is None else int(match[2])
                part = match[4] if expert is None else _MIXTRAL_NAMES.get(match[3], match[3])
                _copy_expert_tensor(w, part, expert, tensor, name)
                parts = ("gate_proj", "up_proj") if part == "gate_up_proj" else (part,)
                experts = range(w.num_experts) if expert is None else (expert,)
                seen.update((layer, p, e) for p in parts for e in experts)

        super().load_weights(dense())
        for w in self.expert_weights:
            missing = sorted(
                f"{p}[{e}]"
                for p in ("gate_proj", "up_proj", "down_proj")
                for e in range(w.num_experts)
                if (w.layer, p, e) not in seen
            )
            if missing:
                shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
                raise KeyError(f"layer {w.layer}: experts' weights missing: {shown}")

    def init_random(self, seed: int, std: float = 0.02) -> None:
        """Random dense weights, and normal(0, std) experts drawn on the model's device one
        layer at a time (then copied to where the experts live)."""
        super().init_random(seed, std)
        device = self.embed_tokens.weight.device
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        for w in self.expert_weights:
            for tensor in (w.gate_up, w.down):
                if tensor.device == device:
                    tensor.normal_(0.0, std, generator=gen)
                else:
                    draw = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
                    tensor.copy_(draw.normal_(0.0, std, generator=gen))


def _copy_expert_tensor(
    w: ExpertWeights, part: str, expert: int | None, tensor: torch.Tensor, name: str
) -> None:
    """Copy one checkpoint tensor into the stacked weights: one expert's gate, up or down
    (expert set), or every expert's gate_up or down (expert None)."""
    f = w.down.shape[2]
    if part == "down_proj":
        dest = w.down if expert is None else w.down[expert]
    else:
        first, end = {"gate_proj": (0, f), "up_proj": (f, 2 * f), "gate_up_proj": (0, 2 * f)}[part]
        dest = w.gate_up[:, first:end] if expert is None else w.gate_up[expert, first:end]
    if dest.shape != tensor.shape:
        raise ValueError(
            f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}"
        )
    dest.copy_(tensor)
