"""Tensor-parallel pieces that need no second process: which heads, rows and columns a rank
holds, how checkpoint tensors are cut, and the step encoding the workers receive."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, MixtralConfig

from strata.attention.backend import BatchLayout
from strata.config import ModelConfig
from strata.engine.tp.step_wire import StepInputs
from strata.kv.policies.rank_share import RankShare
from strata.kv.policies.runtime.gathered import ObservedRows
from strata.kv.policies.runtime.step_kv import LayerLayout
from strata.models.tp.layout import ShardLayout
from strata.models.tp.weights import shard_tensor
from tests.conftest import TINY


def llama(**overrides: object) -> ModelConfig:
    return ModelConfig.from_hf(LlamaConfig(**{**TINY, **overrides}))


def test_kv_heads_split_or_replicated() -> None:
    split = [ShardLayout(llama(num_key_value_heads=4), r, 2) for r in range(2)]
    assert [(s.local_heads, s.local_kv_heads, s.first_kv_head) for s in split] == [
        (2, 2, 0), (2, 2, 2),
    ]  # fmt: skip
    # 2 KV heads over 4 ranks: ranks 0-1 hold head 0, ranks 2-3 head 1, each with the
    # one query head of its group.
    shared = [ShardLayout(llama(num_key_value_heads=2), r, 4) for r in range(4)]
    assert [(s.local_heads, s.first_kv_head, s.kv_replicas) for s in shared] == [
        (1, 0, 2), (1, 0, 2), (1, 1, 2), (1, 1, 2),
    ]  # fmt: skip
    local = shared[3].local_config()
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size) == (1, 1, 32)
    assert local.vocab_size == 512  # the vocabulary-parallel modules shard it themselves


def test_vocabulary_rows_are_padded_on_the_last_rank() -> None:
    cfg = llama(vocab_size=509)
    last = ShardLayout(cfg, 1, 2)
    assert (last.vocab_rows, last.vocab_start) == (255, 255)
    table = torch.arange(509 * 2, dtype=torch.float32).view(509, 2)
    rows = shard_tensor("model.embed_tokens.weight", table, last)
    assert rows.shape == (255, 2)
    assert torch.equal(rows[:254], table[255:]) and not rows[254].any()


def test_projections_are_cut_by_heads_and_halves() -> None:
    cfg = llama(num_key_value_heads=2)  # head_dim 16, 4 query heads
    rank1 = ShardLayout(cfg, 1, 2)
    q = torch.arange(64 * 64, dtype=torch.float32).view(64, 64)
    assert torch.equal(shard_tensor("model.layers.0.self_attn.q_proj.weight", q, rank1), q[32:])
    k = q[:32]
    assert torch.equal(shard_tensor("model.layers.0.self_attn.k_proj.weight", k, rank1), k[16:])
    assert torch.equal(shard_tensor("model.layers.0.self_attn.o_proj.weight", q, rank1), q[:, 32:])
    down = torch.arange(64 * 128, dtype=torch.float32).view(64, 128)
    got = shard_tensor("model.layers.1.mlp.down_proj.weight", down, rank1)
    assert torch.equal(got, down[:, 64:])
    norm = torch.ones(64)
    assert shard_tensor("model.layers.1.input_layernorm.weight", norm, rank1) is norm


def test_stacked_experts_keep_each_rank_a_slice_of_gate_and_of_up() -> None:
    cfg = ModelConfig.from_hf(MixtralConfig(**{**TINY, "num_key_value_heads": 2},
                                            num_local_experts=4))  # fmt: skip
    rank0 = ShardLayout(cfg, 0, 2)
    gate_up = torch.arange(4 * 256 * 2, dtype=torch.float32).view(4, 256, 2)  # F = 128
    got = shard_tensor("model.layers.0.mlp.experts.gate_up_proj", gate_up, rank0)
    assert torch.equal(got, torch.cat([gate_up[:, :64], gate_up[:, 128:192]], dim=1))
    down = torch.arange(4 * 2 * 128, dtype=torch.float32).view(4, 2, 128)
    got = shard_tensor("model.layers.0.mlp.experts.down_proj", down, rank0)
    assert torch.equal(got, down[:, :, :64])
    w1 = torch.zeros(128, 64)
    assert shard_tensor("model.layers.0.block_sparse_moe.experts.3.w1.weight", w1, rank0).shape == (
        64, 64,
    )  # fmt: skip


def test_o_proj_bias_is_added_once() -> None:
    cfg = llama()
    bias = torch.ones(64)
    name = "model.layers.0.self_attn.o_proj.bias"
    assert shard_tensor(name, bias, ShardLayout(cfg, 0, 2)) is bias
    assert not shard_tensor(name, bias, ShardLayout(cfg, 1, 2)).any()


@pytest.mark.parametrize(
    ("overrides", "size", "message"),
    [
        ({}, 3, "3 does not divide the model's 4 attention heads"),
        ({"intermediate_size": 130}, 4, "4 does not divide the model's 130 MLP width"),
        (
            {"hidden_size": 96, "num_attention_heads": 12, "num_key_value_heads": 3}, 2,
            "2 must divide the model's 3 KV heads or be a multiple of them",
        ),
    ],
)  # fmt: skip
def test_unshardable_layouts_are_refused(
    overrides: dict[str, object], size: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ShardLayout(llama(**overrides), 0, size)


def test_step_inputs_round_trip() -> None:
    """Every field comes back; a layer layout over the step's own tables (PyramidKV's
    shorter layers) does not repeat them, one over other tables (attended blocks) does;
    the last two tokens are a recall sequence's, with no pool slots."""
    layout = BatchLayout([3, 1, 1], [3, 9, 17], [[4, 5], [0, 1, 2], [7, 8, 9, 10, 11]], 4)
    shorter = BatchLayout([3, 1, 1], [3, 7, 15], layout.block_tables, 4)
    attended = BatchLayout([3, 1, 1], [3, 7, 15], [[4, 5], [0, 1], [7, 8, 9, 10]], 4)
    parts = (LayerLayout(np.array([16, 17, 18, 6, 42]), shorter),
             LayerLayout(np.array([16, 17, 18, 6, 34]), attended))  # fmt: skip
    rows = [ObservedRows(0, 1, 3, 1, 3), ObservedRows(2, 4, 5, 16, 17, RankShare.MAXED, (0, 2))]
    recall = np.arange(12, dtype=np.int64)  # one recall row (kv/recall/wire.py)
    step = StepInputs(
        np.arange(7, dtype=np.int64), np.array([0, 1, 2, 8, 16, 40, 41]),
        np.array([16, 17, 18, 8, 44]), np.array([2, 3, 4, 6]), layout, ObservedRows.encode(rows),
        np.array([5, 11]), parts, np.array([1, 0, 2]), recall,
    )  # fmt: skip
    data = step.encode()
    assert data.dtype == np.int64
    own = 3 + 3 + 10  # context and table lengths, tables
    pooled = 5
    assert len(data) == (10 + 7 * 2 + pooled + 4 + 3 + (7 + 9) + 2 + 3 + 12 + own
                         + (pooled + 6) + (pooled + 3 + 3 + 8))  # fmt: skip
    back = StepInputs.decode(data)
    assert back.layout == layout
    names = ("ids", "positions", "slots", "logits_rows", "observed", "live_blocks", "layer_of",
             "recall")  # fmt: skip
    for name in names:
        assert np.array_equal(getattr(back, name), getattr(step, name))
    assert ObservedRows.decode(back.observed) == rows
    assert rows[1].slots(0) == (16, 17) and rows[1].slots(1) == (14, 15)
    assert [p.layout for p in back.layer_layouts] == [shorter, attended]
    for got, sent in zip(back.layer_layouts, parts, strict=True):
        assert np.array_equal(got.slot_mapping, sent.slot_mapping)
