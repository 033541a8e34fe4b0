"""Llama-family decoder (Llama 2/3, Qwen2, Mistral, SmolLM) over the paged KV cache.

The model sees a flat batch of tokens from many sequences; the attention backend and
its per-step metadata say which KV each token attends over. Q/K/V and gate/up are
fused into one projection each; weights load from the transformers naming.
The attention also covers the MoE families' variants (q/k norms, o_proj bias, clipped
q/k/v); their MoE layers are in moe.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from strata.attention.backend import AttentionBackend, AttentionMetadata, StepMetadata
from strata.attention.layer_inputs import AttentionInputs, HeadLayout, KVPool
from strata.config import ModelConfig
from strata.models.rope import RotaryEmbedding
from strata.ops.activation import silu_and_mul
from strata.ops.rmsnorm import add_rmsnorm

# transformers projection -> the fused projection holding its rows.
FUSED_INTO: dict[str, str] = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}

# (layer index, the step's queries [tokens, heads, head_dim] after RoPE, softmax scale)
LayerObserver = Callable[[int, torch.Tensor, float], None]


class RMSNorm(nn.Module):
    """rmsnorm(x + residual) and the sum (the next residual); fused on CUDA (strata/ops)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.fused = True

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return add_rmsnorm(x, residual, self.weight, self.eps, self.fused)


class Attention(nn.Module):
    """qkv projection -> backend.write_rope_kv -> observer -> backend.attend -> o_proj.

    The backend sees the module as an AttentionLayer: layer_index, heads, fused."""

    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.heads = HeadLayout(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.scale = cfg.head_dim**-0.5
        self.fused = True  # the backend may fuse RoPE into the KV write
        self.qk_norm = cfg.qk_norm
        self.clip_qkv = cfg.clip_qkv
        if cfg.qk_norm is not None:
            per_head = cfg.qk_norm == "head"
            eps = cfg.rms_norm_eps
            self.q_norm = RMSNorm(cfg.head_dim if per_head else self.q_size, eps)
            self.k_norm = RMSNorm(cfg.head_dim if per_head else self.kv_size, eps)

    def _normed_qkv(self, qkv: torch.Tensor) -> torch.Tensor:
        """q/k norms and clipping as transformers applies them, before RoPE; same layout."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q)[0], self.k_norm(k)[0]
        elif self.qk_norm == "head":  # rows of head_dim: one norm per head
            q = self.q_norm(q.reshape(-1, self.head_dim))[0].view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim))[0].view(k.shape)
        qkv = torch.cat([q, k, v], dim=-1)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        return qkv

    def query(self, h: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE queries [tokens, q_size] of the normed input h, as `forward` makes
        them, without keys and values (a recall prefetch's guess of this layer's picks)."""
        bias = self.qkv_proj.bias
        q = F.linear(h, self.qkv_proj.weight[: self.q_size],
                     None if bias is None else bias[: self.q_size])  # fmt: skip
        if self.qk_norm == "full":
            q = self.q_norm(q)[0]
        elif self.qk_norm == "head":
            q = self.q_norm(q.reshape(-1, self.head_dim))[0].view(q.shape)
        return q if self.clip_qkv is None else q.clamp(-self.clip_qkv, self.clip_qkv)

    def forward(
        self,
        x: torch.Tensor,
        inputs: AttentionInputs,
        backend: AttentionBackend[Any],
        meta: AttentionMetadata,
        observer: LayerObserver | None = None,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if self.qk_norm is not None or self.clip_qkv is not None:
            qkv = self._normed_qkv(qkv)
        q, k_read, v_read = backend.write_rope_kv(self, qkv, inputs, meta)
        if observer is not None:  # sees the cache with the step's K/V written
            observer(self.layer_index, q, self.scale)
        out = backend.attend(q, k_read, v_read, meta, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)); also the shared expert of Qwen2-MoE."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x), self.fused))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        inputs: AttentionInputs,
        backend: AttentionBackend[Any],
        meta: AttentionMetadata,
        observer: LayerObserver | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mlp output, residual): the layer's output is their sum, added by the next norm.

        The residual stream is x + residual, as in transformers (residual None: x alone)."""
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, inputs, backend, meta, observer)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head."""

    # The forward has no host syncs: decode steps may be captured in CUDA graphs.
    supports_cuda_graphs: ClassVar[bool] = True

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, self.make_mlp(cfg, i)) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg.hf_config, cfg.head_dim, max_positions)

    def make_mlp(self, cfg: ModelConfig, layer_index: int) -> nn.Module:
        """The feed-forward block of layer `layer_index` (MoE models override this)."""
        return MLP(cfg.hidden_size, cfg.intermediate_size)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv: KVPool,
        backend: AttentionBackend[Any],
        meta: StepMetadata,
        logits_rows: torch.Tensor,
        observer: LayerObserver | None = None,
    ) -> torch.Tensor:
        """Logits [len(logits_rows), vocab] (float32) for the chosen rows of the flat batch.

        meta may be a LayerwiseMetadata (one per layer); observer, when given, sees each
        layer's queries after the step's K/V are written (KV policies)."""
        x = self.embed_tokens(input_ids)
        residual = None
        inputs = AttentionInputs(positions, self.rope, kv)
        # a backend may start layer i+1's work from layer i's input (recall prefetch)
        ahead = backend.lookahead(meta, positions, self.rope, self._query_of)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if ahead is not None and i < last:
                ahead(i + 1, x, residual)
            x, residual = layer(x, residual, inputs, backend, meta.for_layer(i), observer)
        if residual is not None:
            residual = residual[logits_rows]
        x, _ = self.norm(x[logits_rows], residual)
        return self.lm_head(x).float()

    def _query_of(self, layer: int, stream: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s pre-RoPE queries [tokens, q_size] of residual stream rows."""
        block = self.layers[layer]
        assert isinstance(block, DecoderLayer)
        return block.self_attn.query(block.input_layernorm(stream)[0])

    def set_fused_ops(self, enabled: bool) -> None:
        """Use the fused CUDA kernels of strata/ops (default) or the torch ops: add+RMSNorm,
        SiLU-and-mul, and RoPE in the KV write (where the attention backend has it)."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, MLP, Attention)):
                module.fused = enabled

    # ---- weights ---------------------------------------------------------------------------

    # Parameter-name fragments that differ from transformers': (strata, transformers).
    HF_RENAMES: ClassVar[tuple[tuple[str, str], ...]] = ()

    def fused_parts(self, name: str, rows: int) -> dict[str, tuple[int, int]]:
        """transformers projection -> (first row, end row) inside the fused parameter `name`
        of `rows` rows; empty when `name` is not fused. gate/up: the halves (any MLP size)."""
        cfg = self.config
        if ".qkv_proj." in name:
            q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            return {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}
        if ".gate_up_proj." in name:
            return {"gate_proj": (0, rows // 2), "up_proj": (rows // 2, rows)}
        return {}

    def dense_hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The module's parameters under transformers' names (views; tied lm_head left out)."""
        state: dict[str, torch.Tensor] = {}
        for name, param in self.named_parameters():
            state.update(self.hf_views(name, param.data))
        return state

    def hf_views(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """(transformers name, view) pairs of the parameter `name` holding `tensor`: one,
        or one per projection fused into it."""
        full = name if name.startswith("lm_head") else f"model.{name}"
        for ours, theirs in self.HF_RENAMES:
            full = full.replace(ours, theirs)
        parts = self.fused_parts(name, tensor.shape[0])
        if not parts:
            yield full, tensor
        for part, (first, end) in parts.items():
            fused = FUSED_INTO[part]
            yield full.replace(f".{fused}.", f".{part}."), tensor[first:end]

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        """Every weight of the model (the fingerprint's input)."""
        return list(self.named_parameters())

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight under transformers' names (views; tied lm_head left out)."""
        return self.dense_hf_state_dict()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy transformers-named tensors into the fused parameters; check all were set."""
        cfg = self.config
        params = dict(self.named_parameters())
        expected = {name.removeprefix("model.") for name in self.dense_hf_state_dict()}
        seen: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            target = name
            for ours, theirs in self.HF_RENAMES:
                target = target.replace(theirs, ours)
            part = next((p for p in FUSED_INTO if f".{p}." in target), None)
            if part is not None:
                target = target.replace(f".{part}.", f".{FUSED_INTO[part]}.")
            if target not in params:
                raise KeyError(f"unexpected weight {name!r} for {cfg.model_type}")
            dest = params[target].data
            if part is not None:
                first, end = self.fused_parts(target, dest.shape[0])[part]
                dest = dest[first:end]
            if dest.shape != tensor.shape:
                raise ValueError(
                    f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}"
                )
            dest.copy_(tensor)
            seen.add(name)
        missing = sorted(expected - seen)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise KeyError(f"{len(missing)} weights missing from the checkpoint: {shown}")

    def init_random(self, seed: int, std: float = 0.02) -> None:
        """Random weights for speed work: normal(0, std) matrices, unit norms, zero biases."""
        gen = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        for name, param in self.named_parameters():
            init_random_parameter(name, param.data, gen, std)


def init_random_parameter(
    name: str, tensor: torch.Tensor, gen: torch.Generator, std: float
) -> None:
    """LlamaModel.init_random's draw for one parameter, in place (draws from `gen`)."""
    if name.endswith("norm.weight"):  # layer norms, final norm, q/k norms
        tensor.fill_(1.0)
    elif name.endswith(".bias"):
        tensor.zero_()
    else:
        tensor.normal_(0.0, std, generator=gen)
