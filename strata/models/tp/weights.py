"""A rank's share of each checkpoint tensor, and random weights drawn as the whole model
would draw them.

Tensors stream one at a time under transformers' names; each is cut to the rank's share
(ShardLayout) before it reaches the device, so no device ever holds the whole model:

    q_proj rows       the rank's query heads       o_proj columns    the same heads
    k_proj, v_proj    the rank's KV heads          o_proj bias       rank 0 (zeros elsewhere)
    gate/up rows      chunk r of N                 down columns      chunk r of N
      (dense, shared expert, each expert: gate_proj/up_proj/w1/w3; down_proj/w2)
    experts.gate_up_proj [E, 2F, H]: chunk r of the gate half and of the up half (dim 1)
    experts.down_proj    [E, H, F]:  chunk r of dim 2
    embed_tokens, lm_head  vocabulary rows, zero-padded to vocab_rows
    q_norm, k_norm (OLMoE's whole-projection norms) as q and k; everything else whole
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from strata.models.llama import LlamaModel, init_random_parameter
from strata.models.moe import MoeModel
from strata.models.tp.layout import ShardLayout

_COLUMN = ("gate_proj", "up_proj", "w1", "w3")  # rows split: output features
_ROW = ("down_proj", "w2")  # columns split: input features


def _chunk(tensor: torch.Tensor, dim: int, layout: ShardLayout) -> torch.Tensor:
    size = tensor.shape[dim] // layout.size
    return tensor.narrow(dim, layout.rank * size, size)


def _heads(tensor: torch.Tensor, first: int, count: int, head_dim: int, dim: int) -> torch.Tensor:
    return tensor.narrow(dim, first * head_dim, count * head_dim)


def _vocab_rows(tensor: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    rows = tensor[layout.vocab_start : layout.vocab_start + layout.vocab_rows]
    if rows.shape[0] == layout.vocab_rows:
        return rows
    padded = tensor.new_zeros((layout.vocab_rows, *tensor.shape[1:]))
    padded[: rows.shape[0]] = rows
    return padded


def _attention_share(leaf: str, tensor: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    cfg, d = layout.full, layout.full.head_dim
    q_heads = (layout.rank * layout.local_heads, layout.local_heads)
    kv_heads = (layout.first_kv_head, layout.local_kv_heads)
    if leaf == "q_proj" or (leaf == "q_norm" and cfg.qk_norm == "full"):
        return _heads(tensor, *q_heads, d, 0)
    if leaf in ("k_proj", "v_proj") or (leaf == "k_norm" and cfg.qk_norm == "full"):
        return _heads(tensor, *kv_heads, d, 0)
    return tensor  # per-head q/k norms


def shard_tensor(name: str, tensor: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    """The rank's share of the checkpoint tensor `name` (a view where it can be)."""
    parts = name.split(".")
    is_param = parts[-1] in ("weight", "bias")
    leaf = parts[-2] if is_param else parts[-1]
    if leaf in ("embed_tokens", "lm_head"):
        return _vocab_rows(tensor, layout)
    if leaf in ("q_proj", "k_proj", "v_proj", "q_norm", "k_norm"):
        return _attention_share(leaf, tensor, layout)
    if leaf == "o_proj":
        if parts[-1] == "bias":
            return tensor if layout.rank == 0 else torch.zeros_like(tensor)
        return _heads(tensor, layout.rank * layout.local_heads, layout.local_heads,
                      layout.full.head_dim, 1)  # fmt: skip
    if not is_param and leaf == "gate_up_proj":  # stacked experts [E, 2F, H]
        gate, up = tensor.chunk(2, dim=1)
        return torch.cat([_chunk(gate, 1, layout), _chunk(up, 1, layout)], dim=1)
    if not is_param and leaf == "down_proj":  # stacked experts [E, H, F]
        return _chunk(tensor, 2, layout)
    if leaf in _COLUMN:
        return _chunk(tensor, 0, layout)
    if leaf in _ROW:
        return _chunk(tensor, 1, layout)
    return tensor


def shard_weights(
    weights: Iterable[tuple[str, torch.Tensor]], layout: ShardLayout
) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        yield name, shard_tensor(name, tensor, layout)


def random_full_weights(
    whole: LlamaModel, seed: int, std: float, device: torch.device, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights `whole.init_random(seed, std)` would give the unsharded model (built on
    the meta device), drawn in the same order one tensor at a time on `device`, under
    transformers' names."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in whole.named_parameters():
        tensor = torch.empty(param.shape, dtype=dtype, device=device)
        init_random_parameter(name, tensor, gen, std)
        yield from whole.hf_views(name, tensor)
    if isinstance(whole, MoeModel):
        cfg = whole.config
        experts = torch.Generator(device=device).manual_seed(seed + 1)
        e, f, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        for layer in cfg.moe_layers:
            for part, shape in (("gate_up_proj", (e, 2 * f, h)), ("down_proj", (e, h, f))):
                tensor = torch.empty(shape, dtype=dtype, device=device)
                yield f"model.layers.{layer}.mlp.experts.{part}", tensor.normal_(
                    0.0, std, generator=experts
                )
