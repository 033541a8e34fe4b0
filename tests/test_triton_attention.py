"""The Triton backend against the reference backend, on CPU under Triton's interpreter
(tests/triton_interpret.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from strata.attention.backend import BatchLayout
from strata.attention.reference import ReferenceAttention
from tests.triton_interpret import interpreted

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def tb() -> Iterator[ModuleType]:
    with interpreted("strata.attention.triton_backend", "strata.attention.triton_") as module:
        yield module


def make_batch(
    specs: list[tuple[int, int]], block_size: int, num_blocks: int, gen: torch.Generator
) -> tuple[BatchLayout, torch.Tensor]:
    """specs: (query_len, context_len) per sequence; blocks drawn from a shuffled pool."""
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots = [], []
    for q_len, ctx in specs:
        n = -(-ctx // block_size)
        table = [pool.pop() for _ in range(n)] + [pool.pop()]  # one spare block past the end
        tables.append(table)
        slots += [
            table[p // block_size] * block_size + p % block_size for p in range(ctx - q_len, ctx)
        ]
    layout = BatchLayout(
        query_lens=[q for q, _ in specs],
        context_lens=[c for _, c in specs],
        block_tables=tables,
        block_size=block_size,
    )
    return layout, torch.tensor(slots, dtype=torch.long)


def run_both(
    tb: ModuleType,
    specs: list[tuple[int, int]],
    block_size: int = 8,
    kv_heads: int = 2,
    group: int = 2,
    head_dim: int = 32,
    num_splits: int | None = None,
    seed: int = 0,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    need = sum(-(-c // block_size) + 1 for _, c in specs)
    num_blocks = need + 3
    layout, slots = make_batch(specs, block_size, num_blocks, gen)
    tokens = sum(q for q, _ in specs)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen)
    v_cache = torch.randn(shape, generator=gen)
    q = torch.randn(tokens, kv_heads * group, head_dim, generator=gen)
    k = torch.randn(tokens, kv_heads, head_dim, generator=gen)
    v = torch.randn(tokens, kv_heads, head_dim, generator=gen)
    scale = head_dim**-0.5

    ref = ReferenceAttention()
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref_meta = ref.prepare(layout, slots, torch.device("cpu"))
    ref.write_kv(ref_k, ref_v, k, v, ref_meta)
    expected = ref.attend(q, ref_k, ref_v, ref_meta, scale)

    backend = tb.TritonAttention(num_splits=num_splits)
    meta = backend.prepare(layout, slots, torch.device("cpu"))
    backend.write_kv(k_cache, v_cache, k, v, meta)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    got = backend.attend(q, k_cache, v_cache, meta, scale)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


# contexts around block edges: 1, a full block, one past, several blocks
DECODES = [(1, 1), (1, 7), (1, 8), (1, 9), (1, 33), (1, 100)]


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode(tb: ModuleType, group: int, num_splits: int) -> None:
    run_both(tb, DECODES, group=group, num_splits=num_splits, seed=group * 10 + num_splits)


@pytest.mark.parametrize("block_size", [8, 16])
def test_decode_many_splits(tb: ModuleType, block_size: int) -> None:
    run_both(tb, [(1, 150), (1, 3), (1, 64)], block_size=block_size, group=4, num_splits=8)


def test_decode_default_splits(tb: ModuleType) -> None:
    run_both(tb, [(1, 600), (1, 5)], kv_heads=1, group=2, head_dim=16)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_prefill_without_prefix(tb: ModuleType, group: int) -> None:
    run_both(tb, [(5, 5), (17, 17), (40, 40)], group=group, seed=group)


@pytest.mark.parametrize("block_size", [8, 16])
def test_prefill_with_prefix(tb: ModuleType, block_size: int) -> None:
    specs = [(9, 30), (2, 17), (33, 64), (3, 3)]
    run_both(tb, specs, block_size=block_size, group=4, seed=block_size)


@pytest.mark.parametrize("head_dim", [16, 64])
def test_mixed_batch(tb: ModuleType, head_dim: int) -> None:
    specs = [(1, 40), (12, 50), (1, 1), (70, 70), (1, 17), (4, 9)]
    run_both(tb, specs, block_size=16, group=4, head_dim=head_dim, num_splits=4, seed=head_dim)


def test_short_chunks_over_long_prefixes_run_as_decode_rows(
    tb: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    from strata.attention import triton_meta

    monkeypatch.setattr(triton_meta, "LONG_PREFIX", 40)
    # (12, 80) and (3, 60) split into decode rows; (20, 80) is too long a chunk and
    # (5, 30) too short a prefix, so they stay prefill rows beside them.
    specs = [(12, 80), (1, 50), (20, 80), (3, 60), (5, 30)]
    layout, slots = make_batch(specs, 8, 60, torch.Generator().manual_seed(0))
    meta = triton_meta.build_metadata(layout, slots, torch.device("cpu"))
    assert meta.decode is not None and meta.prefill is not None
    assert meta.decode.seq_lens.tolist() == [*range(69, 81), 50, 58, 59, 60]
    assert meta.decode.query_rows.tolist() == [*range(12), 12, 33, 34, 35]
    assert meta.prefill.cu_query_lens.tolist() == [0, 20, 25]
    run_both(tb, specs, block_size=8, group=4, num_splits=3, seed=5)


def test_non_power_of_two_group(tb: ModuleType) -> None:
    run_both(tb, [(1, 45), (20, 45)], kv_heads=3, group=3)


def test_padding_rows_write_zeros_and_skip_slots(tb: ModuleType) -> None:
    """Graph padding: seq_len 0 rows give zeros; slot -1 leaves the cache alone."""
    meta_mod = sys.modules["strata.attention.triton_meta"]
    gen = torch.Generator().manual_seed(7)
    layout, slots = make_batch([(1, 20), (1, 9)], 8, 10, gen)
    k_cache = torch.randn(10, 8, 2, 32, generator=gen)
    v_cache = torch.randn(10, 8, 2, 32, generator=gen)
    q = torch.randn(4, 4, 32, generator=gen)
    kv = torch.randn(4, 2, 32, generator=gen)
    for splits in (1, 4):
        backend = tb.TritonAttention(num_splits=splits)
        live = backend.prepare(layout, slots, torch.device("cpu"))
        static = meta_mod.DecodeMetadata.allocate(4, 6, 64, torch.device("cpu"))
        static.fill_(live.decode)
        padded = meta_mod.TritonMetadata(
            torch.cat([slots, torch.tensor([-1, -1])]), 8, static, None
        )
        before = k_cache.clone()
        backend.write_kv(k_cache, v_cache, kv, kv, padded)
        assert torch.equal(k_cache.view(-1, 2, 32)[slots], kv[:2])
        before.view(-1, 2, 32)[slots] = kv[:2]
        assert torch.equal(k_cache, before)
        got = backend.attend(q, k_cache, v_cache, padded, 32**-0.5)
        want = backend.attend(q[:2], k_cache, v_cache, live, 32**-0.5)
        torch.testing.assert_close(got[:2], want, atol=1e-6, rtol=1e-6)
        assert torch.equal(got[2:], torch.zeros_like(got[2:]))


def test_registered_by_name(tb: ModuleType) -> None:
    from strata.attention.backend import get_backend

    assert isinstance(get_backend("triton"), tb.TritonAttention)


def test_graph_hooks_replay_a_live_decode_step(tb: ModuleType) -> None:
    """graph_metadata / graph_rows / fill_graph_metadata, as cuda_graphs.py replays: the
    static rows give the live step's output; padding rows write nothing and give zeros."""
    gen = torch.Generator().manual_seed(3)
    layout, slots = make_batch([(1, 20), (1, 9), (1, 30)], 8, 16, gen)
    k_cache = torch.randn(16, 8, 2, 32, generator=gen)
    v_cache = torch.randn(16, 8, 2, 32, generator=gen)
    q = torch.randn(4, 4, 32, generator=gen)
    kv = torch.randn(4, 2, 32, generator=gen)
    backend = tb.TritonAttention(num_splits=2)
    assert backend.graph_safe
    live = backend.prepare(layout, slots, torch.device("cpu"))
    live_k, live_v = k_cache.clone(), v_cache.clone()
    backend.write_kv(live_k, live_v, kv[:3], kv[:3], live)
    want = backend.attend(q[:3], live_k, live_v, live, 32**-0.5)

    slot_buffer = torch.full((6,), -1, dtype=torch.long)
    static = backend.graph_metadata(slot_buffer, 8, 64)
    rows = backend.graph_rows(static, 4)
    slot_buffer[:3] = slots
    seq_lens = torch.tensor([20, 9, 30, 0], dtype=torch.int32)
    tables = torch.tensor([t[:4] + [0] * (4 - len(t[:4])) for t in layout.block_tables[:3]])
    backend.fill_graph_metadata(rows, seq_lens, tables.to(torch.int32))
    backend.write_kv(k_cache, v_cache, kv, kv, rows)
    got = backend.attend(q, k_cache, v_cache, rows, 32**-0.5)
    assert torch.equal(k_cache, live_k) and torch.equal(v_cache, live_v)
    torch.testing.assert_close(got[:3], want, atol=1e-6, rtol=1e-6)
    assert torch.equal(got[3], torch.zeros_like(got[3]))
