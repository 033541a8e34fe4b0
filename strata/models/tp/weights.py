"""A rank's share of each checkpoint tensor, and random weights drawn as the whole model
would draw them.

Tensors stream one at a time under transformers' names; each is cut to the rank's share
(ShardLayout) before it reaches the device, so no device ever holds the whole model. From
safetensors a rank reads only its share (`Cut.apply` on a lazy slice):

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

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from strata.models.llama import LlamaModel, init_random_parameter
from strata.models.moe import MoeModel
from strata.models.tp.layout import ShardLayout

_COLUMN = ("gate_proj", "up_proj", "w1", "w3")  # rows split: output features
_ROW = ("down_proj", "w2")  # columns split: input features


class Sliceable(Protocol):
    """A full tensor, or a lazy one (safetensors' get_slice) that reads only what an
    index asks for."""

    def __getitem__(self, index: tuple[slice, ...]) -> torch.Tensor: ...


@dataclass(frozen=True)
class Cut:
    """A rank's share of one checkpoint tensor: its `pieces` (one index each)
    concatenated along `dim`, then `pad` zero rows; `zero`: zeros shaped like them."""

    pieces: tuple[tuple[slice, ...], ...]
    dim: int = 0
    pad: int = 0
    zero: bool = False

    def apply(self, source: Sliceable) -> torch.Tensor:
        parts = [source[index] for index in self.pieces]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)
        if self.zero:
            return torch.zeros_like(out)
        if self.pad:
            out = torch.cat([out, out.new_zeros((self.pad, *out.shape[1:]))])
        return out


def _along(dim: int, start: int, length: int) -> tuple[slice, ...]:
    return (*(slice(None),) * dim, slice(start, start + length))


def _chunk(shape: Sequence[int], dim: int, layout: ShardLayout) -> Cut:
    size = shape[dim] // layout.size
    return Cut((_along(dim, layout.rank * size, size),))


def _heads(first: int, count: int, layout: ShardLayout, dim: int) -> Cut:
    d = layout.full.head_dim
    return Cut((_along(dim, first * d, count * d),))


def _attention_cut(leaf: str, param: str, layout: ShardLayout) -> Cut | None:
    whole_norm = layout.full.qk_norm == "full"
    q_heads = (layout.rank * layout.local_heads, layout.local_heads)
    if leaf == "q_proj" or (leaf == "q_norm" and whole_norm):
        return _heads(*q_heads, layout, 0)
    if leaf in ("k_proj", "v_proj") or (leaf == "k_norm" and whole_norm):
        return _heads(layout.first_kv_head, layout.local_kv_heads, layout, 0)
    if leaf == "o_proj" and param == "bias":  # row-parallel: added once, by rank 0
        return None if layout.rank == 0 else Cut(((slice(None),),), zero=True)
    if leaf == "o_proj":
        return _heads(*q_heads, layout, 1)
    return None  # per-head q/k norms


def cut_for(name: str, shape: Sequence[int], layout: ShardLayout) -> Cut | None:
    """The rank's share of the checkpoint tensor `name` of `shape`; None: all of it."""
    parts = name.split(".")
    is_param = parts[-1] in ("weight", "bias")
    leaf = parts[-2] if is_param else parts[-1]
    if leaf in ("embed_tokens", "lm_head"):
        start = layout.vocab_start
        rows = max(min(layout.vocab_rows, shape[0] - start), 0)
        return Cut((_along(0, start, rows),), pad=layout.vocab_rows - rows)
    if leaf in ("q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "o_proj"):
        return _attention_cut(leaf, parts[-1], layout)
    if not is_param and leaf == "gate_up_proj":  # stacked experts [E, 2F, H]
        f, n = shape[1] // 2, shape[1] // 2 // layout.size
        first = layout.rank * n
        return Cut((_along(1, first, n), _along(1, f + first, n)), dim=1)
    if not is_param and leaf == "down_proj":  # stacked experts [E, H, F]
        return _chunk(shape, 2, layout)
    if leaf in _COLUMN:
        return _chunk(shape, 0, layout)
    if leaf in _ROW:
        return _chunk(shape, 1, layout)
    return None


def shard_tensor(name: str, tensor: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    """The rank's share of the checkpoint tensor `name` (a view where it can be)."""
    cut = cut_for(name, tensor.shape, layout)
    return tensor if cut is None else cut.apply(tensor)


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
