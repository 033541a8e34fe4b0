"""The recall seam: a policy names, per step and layer, the blocks a sequence attends over.

A tiny test policy attends over a subset of the sequence's own blocks, nothing compacted.
Attention through the step's layouts and the reference backend equals softmax attention
computed directly over exactly those blocks; the engine's greedy tokens equal
transformers' under the equivalent attention mask; a policy that names no blocks
changes nothing.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import strata.kv.policies.runtime.driver as driver
from strata import LLM, SamplingParams
from strata.attention.reference import ReferenceAttention
from strata.engine.plan import ScheduledChunk, StepPlan
from strata.engine.sequence import Sequence
from strata.kv.policies.attended import AttendedBlocks, ChunkSlots
from strata.kv.policies.base import AttentionShape, KVPolicy, KVView
from strata.kv.policies.runtime.sequence_kv import SequenceKV
from strata.kv.policies.runtime.step_kv import KVStepBuilder, StepKV
from tests.conftest import assert_no_leaks
from tests.kv_policy_support import BLOCK, GREEDY, LAYERS, PROMPT, tiny_policy_model

HEADS, KV_HEADS, DIM = 4, 2, 8
SCALE = DIM**-0.5


class OwnTable(KVPolicy):
    """Names no blocks: every layer attends over the sequence's own table."""

    name = "own_table"

    def select(self, view: KVView, keep: list[int]) -> list[torch.Tensor]:
        raise AssertionError("a policy that only picks blocks never compacts")


class PickedBlocks(OwnTable):
    """Per layer, the own blocks at fixed indices before the chunk's, then the chunk's.
    Layers listed with the same indices share one AttendedBlocks object."""

    name = "picked_blocks"

    def __init__(self, shape: AttentionShape, per_layer: list[list[int]]) -> None:
        super().__init__(shape)
        self.per_layer = per_layer

    def attended_blocks(self, view: KVView, chunk: ChunkSlots) -> list[AttendedBlocks] | None:
        made: dict[tuple[int, ...], AttendedBlocks] = {}
        for earlier in self.per_layer:
            if tuple(earlier) not in made:
                made[tuple(earlier)] = chunk.attend_blocks(earlier)
        return [made[tuple(earlier)] for earlier in self.per_layer]


class EveryOtherBlockWhileDecoding(OwnTable):
    """Decode steps attend the even own blocks before the query's block, then that block."""

    name = "every_other_block"

    def attended_blocks(self, view: KVView, chunk: ChunkSlots) -> list[AttendedBlocks] | None:
        if chunk.num_tokens != 1:
            return None
        head = chunk.first_slot // chunk.block_size
        picked = chunk.attend_blocks(list(range(0, head, 2)))
        return [picked] * self.shape.num_layers


# ---- the step's layouts, through the reference backend -----------------------------------


def request(request_id: str, num_tokens: int, policy: KVPolicy | None) -> Sequence:
    seq = Sequence(request_id, None, list(range(num_tokens)), SamplingParams(), 0, 1)
    if policy is not None:
        seq.kv = SequenceKV(seq, policy, 1000, num_tokens, num_tokens, torch.device("cpu"))
    return seq


def chunk(seq: Sequence, start: int, n: int, table: list[int]) -> ScheduledChunk:
    seq.num_computed = start  # during a step: the chunk's tokens are not computed yet
    return ScheduledChunk(seq, start, n, table)


def attend(step: StepKV, layer: int, q: torch.Tensor, pools: Any, kv: Any) -> torch.Tensor:
    """The model's attention in one layer: write the step's K/V, then attend."""
    part = step.layer_layouts[step.layer_of[layer]] if not step.uniform else step
    slots = torch.from_numpy(part.slot_mapping)
    backend = ReferenceAttention()
    meta = backend.prepare(part.layout, slots, torch.device("cpu"))
    backend.write_kv(pools.k[layer], pools.v[layer], kv[0][layer], kv[1][layer], meta)
    return backend.attend(q, pools.k[layer], pools.v[layer], meta, SCALE)


def direct(
    q: torch.Tensor, pools: Any, layer: int, table: list[int], start: int, keys: list[int]
) -> torch.Tensor:
    """Softmax attention of the queries at slots start, start+1, ... over the slots `keys`
    (causal: up to its own) of a sequence's blocks, computed from the pools."""
    k_flat = pools.k[layer].reshape(-1, KV_HEADS, DIM)
    v_flat = pools.v[layer].reshape(-1, KV_HEADS, DIM)
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        seen = [s for s in keys if s <= start + i]
        phys = torch.tensor([table[s // BLOCK] * BLOCK + s % BLOCK for s in seen])
        k = k_flat[phys].repeat_interleave(HEADS // KV_HEADS, dim=1)  # [n, heads, dim]
        v = v_flat[phys].repeat_interleave(HEADS // KV_HEADS, dim=1)
        probs = torch.softmax(torch.einsum("hd,nhd->hn", q[i], k) * SCALE, dim=-1)
        out[i] = torch.einsum("hn,nhd->hd", probs, v)
    return out


def block_slots(blocks: list[int]) -> list[int]:
    return [b * BLOCK + o for b in blocks for o in range(BLOCK)]


def test_attention_over_picked_blocks_equals_direct_attention() -> None:
    torch.manual_seed(0)
    shape = AttentionShape(LAYERS, HEADS, KV_HEADS, DIM)
    pools = SimpleNamespace(
        k=torch.randn(LAYERS, 40, BLOCK, KV_HEADS, DIM),
        v=torch.randn(LAYERS, 40, BLOCK, KV_HEADS, DIM),
        block_size=BLOCK,
        num_layers=LAYERS,
    )
    picks = [[0, 2, 4], [1], [0, 2, 4]]  # layers 0 and 2 share their blocks
    recall = request("recall", 30, PickedBlocks(shape, picks))
    plain = request("plain", 12, None)
    own = request("own", 8, OwnTable(shape))
    tables = [[7, 3, 9, 1, 12, 5, 20, 2], [30, 31, 32], [15, 16, 17, 18]]
    # recall: 3 tokens at slots 22..24 (blocks 5, 6); plain: a decode; own: a prefill chunk
    plan = StepPlan((
        chunk(recall, 22, 3, tables[0]), chunk(plain, 9, 1, tables[1]), chunk(own, 3, 5, tables[2])
    ))  # fmt: skip
    step = KVStepBuilder(pools).build(plan)  # type: ignore[arg-type]
    assert step.layer_of == [0, 1, 0] and len(step.layer_layouts) == 2
    assert step.observer is None
    q = torch.randn(9, HEADS, DIM)
    new_kv = (torch.randn(LAYERS, 9, KV_HEADS, DIM), torch.randn(LAYERS, 9, KV_HEADS, DIM))
    for layer in range(LAYERS):
        out = attend(step, layer, q, pools, new_kv)
        recall_keys = block_slots(picks[layer]) + list(range(20, 25))  # + the chunk's blocks
        # (batch rows, table, first query slot, attended slots) of each sequence
        for rows, table, start, keys in [
            (slice(0, 3), tables[0], 22, recall_keys),
            (slice(3, 4), tables[1], 9, list(range(10))),
            (slice(4, 9), tables[2], 3, list(range(8))),
        ]:
            expected = direct(q[rows], pools, layer, table, start, keys)
            torch.testing.assert_close(out[rows], expected)


def test_naming_no_blocks_keeps_the_plain_layout() -> None:
    shape = AttentionShape(LAYERS, HEADS, KV_HEADS, DIM)
    pools = SimpleNamespace(k=torch.zeros(1), block_size=BLOCK, num_layers=LAYERS)
    table = [4, 8, 6, 2]
    steps = []
    for policy in (None, OwnTable(shape)):
        seq = request("a", 14, policy)
        plan = StepPlan((chunk(seq, 10, 4, table),))
        steps.append(KVStepBuilder(pools).build(plan))  # type: ignore[arg-type]
    plain, own = steps
    assert own.uniform and plain.uniform and own.observer is None
    assert own.layout == plain.layout
    assert own.slot_mapping.tolist() == plain.slot_mapping.tolist() == [26, 27, 8, 9]


def test_attend_blocks_rejects_blocks_past_the_chunk() -> None:
    where = ChunkSlots(start=9, num_tokens=1, first_slot=9, block_table=[5, 6, 7], block_size=4)
    assert where.attend_blocks([0]) == AttendedBlocks([5, 7], 4 + 2)
    with pytest.raises(ValueError, match="first block 2"):
        where.attend_blocks([2])


# ---- the engine: greedy tokens against transformers ---------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    return tiny_policy_model(tmp_path_factory, "tiny-attended-blocks")


def engine_tokens(
    tiny: Any, policy: type[KVPolicy], monkeypatch: pytest.MonkeyPatch, n: int
) -> list[int]:
    monkeypatch.setattr(driver, "create_policy", lambda name, shape: policy(shape))
    llm = LLM(str(tiny[0]), device="cpu", num_kv_blocks=160, block_size=BLOCK)
    params = SamplingParams(kv_policy="snapkv", kv_budget=1000, max_tokens=n, **GREEDY)
    tokens = llm.generate([PROMPT], params)[0].token_ids
    assert llm.stats()["kv_compactions"] == 0
    assert_no_leaks(llm)
    return tokens


def test_engine_decodes_over_the_picked_blocks(tiny: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    n = 8
    out = engine_tokens(tiny, EveryOtherBlockWhileDecoding, monkeypatch, n)
    ids, c = list(PROMPT), len(PROMPT)
    expected: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            t = len(ids)
            q, key = torch.arange(t)[:, None], torch.arange(t)[None, :]
            head = q // BLOCK  # the query's block
            picked = ((key // BLOCK) % 2 == 0) | (key // BLOCK == head)
            allowed = (key <= q) & ((q < c) | picked)
            mask = torch.zeros(1, 1, t, t).masked_fill(~allowed, float("-inf"))
            logits = tiny[1](torch.tensor([ids]), attention_mask=mask).logits[0, -1]
            expected.append(int(logits.argmax()))
            ids.append(expected[-1])
    assert out == expected
    full = LLM(str(tiny[0]), device="cpu", num_kv_blocks=160, block_size=BLOCK)
    plain = full.generate([PROMPT], SamplingParams(max_tokens=n, **GREEDY))[0].token_ids
    assert out != plain  # the picked blocks matter


def test_engine_policy_naming_no_blocks_changes_nothing(
    tiny: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = LLM(str(tiny[0]), device="cpu", num_kv_blocks=160, block_size=BLOCK)
    plain = full.generate([PROMPT], SamplingParams(max_tokens=8, **GREEDY))[0].token_ids
    assert engine_tokens(tiny, OwnTable, monkeypatch, 8) == plain
