"""BlockPool: allocation order, free-list order, reference counts and misuse errors."""

from __future__ import annotations

import pytest

from strata.kv.blocks import BlockPool


def _allocate_n(pool: BlockPool, n: int) -> list[int]:
    return [pool.allocate() for _ in range(n)]


def test_fresh_pool_state() -> None:
    pool = BlockPool(4)
    assert pool.num_blocks == 4
    assert pool.num_free == 4
    assert pool.free_order() == [0, 1, 2, 3]
    assert pool.refcount == [0, 0, 0, 0]
    assert all(pool.is_free(b) for b in range(4))


def test_allocation_order_is_ascending_ids() -> None:
    pool = BlockPool(5)
    assert _allocate_n(pool, 5) == [0, 1, 2, 3, 4]
    assert pool.num_free == 0
    assert pool.free_order() == []
    assert pool.refcount == [1, 1, 1, 1, 1]
    assert not any(pool.is_free(b) for b in range(5))


def test_allocate_pops_front_of_free_list() -> None:
    pool = BlockPool(4)
    assert pool.allocate() == 0
    assert pool.free_order() == [1, 2, 3]
    assert pool.allocate() == 1
    assert pool.free_order() == [2, 3]


def test_release_appends_at_back_and_allocate_reuses_in_release_order() -> None:
    pool = BlockPool(5)
    _allocate_n(pool, 4)  # 0..3 taken; 4 is still free
    assert pool.free_order() == [4]
    pool.release(2)
    pool.release(0)
    pool.release(3)
    assert pool.free_order() == [4, 2, 0, 3]
    assert pool.refcount == [0, 1, 0, 0, 0]
    # Least recently released first: 4 (never taken), then 2, 0, 3.
    assert _allocate_n(pool, 4) == [4, 2, 0, 3]
    assert pool.free_order() == []
    assert pool.refcount == [1, 1, 1, 1, 1]


def test_release_then_allocate_interleaved() -> None:
    pool = BlockPool(3)
    a, b, c = _allocate_n(pool, 3)
    assert (a, b, c) == (0, 1, 2)
    pool.release(b)
    assert pool.allocate() == 1
    pool.release(c)
    pool.release(a)
    assert pool.free_order() == [2, 0]
    assert pool.allocate() == 2
    assert pool.free_order() == [0]


def test_acquire_of_free_block_removes_it_from_free_list() -> None:
    pool = BlockPool(4)
    _allocate_n(pool, 3)
    pool.release(1)
    pool.release(0)
    assert pool.free_order() == [3, 1, 0]
    pool.acquire(1)  # revive a released block (prefix hit)
    assert pool.refcount[1] == 1
    assert not pool.is_free(1)
    assert pool.free_order() == [3, 0]
    assert pool.num_free == 2
    # The revived block is not handed out again by allocate.
    assert _allocate_n(pool, 2) == [3, 0]
    assert pool.num_free == 0


def test_acquire_never_allocated_block() -> None:
    pool = BlockPool(3)
    pool.acquire(2)
    assert pool.free_order() == [0, 1]
    assert pool.refcount == [0, 0, 1]
    assert _allocate_n(pool, 2) == [0, 1]


def test_refcount_above_one_keeps_block_off_free_list() -> None:
    pool = BlockPool(3)
    block = pool.allocate()
    pool.acquire(block)
    pool.acquire(block)
    assert pool.refcount[block] == 3
    assert pool.free_order() == [1, 2]
    pool.release(block)
    assert pool.refcount[block] == 2
    assert not pool.is_free(block)
    pool.release(block)
    assert pool.refcount[block] == 1
    assert pool.free_order() == [1, 2]
    pool.release(block)
    assert pool.refcount[block] == 0
    assert pool.is_free(block)
    assert pool.free_order() == [1, 2, 0]


def test_acquire_of_held_block_does_not_touch_free_list() -> None:
    pool = BlockPool(3)
    block = pool.allocate()
    before = pool.free_order()
    pool.acquire(block)
    assert pool.free_order() == before == [1, 2]
    assert pool.num_free == 2


def test_over_release_raises_and_changes_nothing() -> None:
    pool = BlockPool(3)
    block = pool.allocate()
    pool.release(block)
    with pytest.raises(RuntimeError, match=r"block 0 released more often than acquired"):
        pool.release(block)
    assert pool.refcount == [0, 0, 0]
    assert pool.free_order() == [1, 2, 0]


def test_release_of_never_allocated_block_raises() -> None:
    pool = BlockPool(2)
    with pytest.raises(RuntimeError, match=r"block 1 released more often than acquired"):
        pool.release(1)
    assert pool.free_order() == [0, 1]
    assert pool.refcount == [0, 0]


def test_allocate_when_empty_raises_and_changes_nothing() -> None:
    pool = BlockPool(2)
    _allocate_n(pool, 2)
    with pytest.raises(RuntimeError, match=r"no free block"):
        pool.allocate()
    assert pool.refcount == [1, 1]
    assert pool.free_order() == []


@pytest.mark.parametrize("num_blocks", [0, -1, -10])
def test_non_positive_num_blocks_rejected(num_blocks: int) -> None:
    with pytest.raises(ValueError, match=rf"num_blocks must be > 0, got {num_blocks}"):
        BlockPool(num_blocks)


def test_single_block_pool_cycle() -> None:
    pool = BlockPool(1)
    for _ in range(3):
        assert pool.allocate() == 0
        assert pool.num_free == 0
        pool.release(0)
        assert pool.free_order() == [0]
