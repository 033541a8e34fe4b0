"""KVManager block tables, prefix keys and the prefix index."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import pytest

from strata.kv.manager import KVIntegrityError, KVManager, PrefixMatch
from strata.kv.prefix import KEY_FORMAT, PrefixIndex, chain_key, root_key

ROOT = root_key("test-model", "fp16/bs4")


def _manager(num_blocks: int = 8, block_size: int = 4, caching: bool = True) -> KVManager:
    kv = KVManager(num_blocks, block_size, ROOT, enable_prefix_caching=caching)
    kv.check_integrity()
    return kv


def _prefill(kv: KVManager, seq_id: str, tokens: Sequence[int]) -> PrefixMatch:
    """Admit a whole prompt, compute all of it and commit; returns the prefix match used."""
    match = kv.match_prefix(tokens)
    assert kv.admit(seq_id, match, len(tokens), num_prompt=len(tokens))
    kv.check_integrity()
    kv.commit(seq_id, tokens, len(tokens))
    kv.check_integrity()
    return match


def _free(kv: KVManager, seq_id: str) -> None:
    kv.free(seq_id)
    kv.check_integrity()


def _keys(tokens: Sequence[int], block_size: int, root: bytes = ROOT) -> list[bytes]:
    """Chain keys of every full block of `tokens`, computed with hashlib directly."""
    keys: list[bytes] = []
    parent = root
    for i in range(len(tokens) // block_size):
        chunk = tokens[i * block_size : (i + 1) * block_size]
        parent = hashlib.sha256(parent + struct.pack(f"<{len(chunk)}q", *chunk)).digest()
        keys.append(parent)
    return keys


# ---- keys ---------------------------------------------------------------------------------


def test_root_and_chain_key_known_values() -> None:
    expected_root = hashlib.sha256(b"strata-kv/1" + b"\0tiny-model\0bf16/bs2").digest()
    expected_chain = hashlib.sha256(expected_root + struct.pack("<2q", 7, 300)).digest()
    assert KEY_FORMAT == b"strata-kv/1"
    root = root_key("tiny-model", "bf16/bs2")
    assert root == expected_root
    assert root.hex() == "745ea89745c6a32aa8d08cf7407b4480653294e4156b4b5a3eb60b68767539fe"
    key = chain_key(root, [7, 300])
    assert key == expected_chain
    assert key.hex() == "df2dfd1ce9781440dfc827ddc2e6ca5b0ed9a1aa81a9b491eefd23d3f6cf9af9"
    assert len(key) == 32


def test_keys_are_deterministic_across_calls() -> None:
    assert root_key("m", "l") == root_key("m", "l")
    assert chain_key(ROOT, [1, 2, 3]) == chain_key(ROOT, (1, 2, 3))
    assert chain_key(ROOT, [1, 2, 3]) == chain_key(ROOT, [1, 2, 3])


def test_keys_depend_on_every_input() -> None:
    keys = {
        root_key("model-a", "layout"),
        root_key("model-b", "layout"),
        root_key("model-a", "layout2"),
        # The separator keeps the two fields apart: "ab"+"c" is not "a"+"bc".
        root_key("ab", "c"),
        root_key("a", "bc"),
    }
    assert len(keys) == 5
    root_a = root_key("model-a", "layout")
    root_b = root_key("model-b", "layout")
    chains = {
        chain_key(root_a, [1, 2]),
        chain_key(root_b, [1, 2]),  # parent differs
        chain_key(root_a, [2, 1]),  # order differs
        chain_key(root_a, [1, 3]),  # a token differs
        chain_key(root_a, [1, 2, 0]),  # length differs
        chain_key(chain_key(root_a, [1, 2]), [1, 2]),  # deeper in the chain
    }
    assert len(chains) == 6


# ---- PrefixIndex ----------------------------------------------------------------------------


def test_prefix_index_insert_lookup_remove() -> None:
    index = PrefixIndex()
    key = chain_key(ROOT, [1, 2, 3, 4])
    other = chain_key(ROOT, [5, 6, 7, 8])
    assert index.lookup(key, [1, 2, 3, 4]) is None
    assert index.insert(key, [1, 2, 3, 4], 3)
    assert len(index) == 1
    assert index.lookup(key, [1, 2, 3, 4]) == 3
    assert index.lookup(key, (1, 2, 3, 4)) == 3
    assert index.key_of(3) == key
    assert index.key_of(0) is None
    # Same key or same block again: refused, nothing changes.
    assert not index.insert(key, [1, 2, 3, 4], 5)
    assert not index.insert(other, [5, 6, 7, 8], 3)
    assert index.items() == [(key, 3)]
    assert index.check() == []
    assert index.remove_block(3) == key
    assert index.remove_block(3) is None
    assert len(index) == 0
    assert index.lookup(key, [1, 2, 3, 4]) is None
    assert index.check() == []


def test_prefix_index_lookup_verifies_token_ids() -> None:
    index = PrefixIndex()
    key = chain_key(ROOT, [1, 2, 3, 4])
    # A forged entry: the right key but other tokens (as a hash collision would give).
    assert index.insert(key, [1, 2, 3, 5], 0)
    assert index.lookup(key, [1, 2, 3, 4]) is None
    assert index.lookup(key, [1, 2, 3, 5]) == 0


def test_match_prefix_rejects_forged_index_entry() -> None:
    kv = _manager()
    tokens = [1, 2, 3, 4, 5]
    key0 = _keys(tokens, 4)[0]
    assert kv.index.insert(key0, [9, 9, 9, 9], 6)
    match = kv.match_prefix(tokens)
    assert match.block_ids == ()
    assert match.num_tokens == 0
    assert kv.match_prefix([9, 9, 9, 9, 1]).block_ids == ()  # other key, same tokens


def test_prefix_index_check_reports_disagreement() -> None:
    index = PrefixIndex()
    key = chain_key(ROOT, [1])
    index.insert(key, [1], 0)
    index._block_of[chain_key(ROOT, [2])] = 0
    problems = index.check()
    assert problems[0] == "prefix index has 2 keys but 1 blocks"
    assert len(problems) == 2
    assert "mismatch" in problems[1]


# ---- matching ------------------------------------------------------------------------------


def test_match_prefix_leaves_at_least_one_token() -> None:
    kv = _manager(num_blocks=8, block_size=4)
    tokens = list(range(100, 112))  # 3 full blocks
    _prefill(kv, "a", tokens)
    assert len(kv.index) == 3
    table = kv.block_table("a")
    assert table == [0, 1, 2]
    # Exactly 2 full blocks: at most 1 may match, the last token must be computed.
    m2 = kv.match_prefix(tokens[:8])
    assert m2.block_ids == (0,)
    assert m2.num_tokens == 4
    assert m2.keys == tuple(_keys(tokens, 4)[:1])
    # One token more: both blocks match.
    m9 = kv.match_prefix(tokens[:9])
    assert m9.block_ids == (0, 1)
    assert m9.num_tokens == 8
    # The whole prompt (12 = 3 blocks): 2 match.
    assert kv.match_prefix(tokens).block_ids == (0, 1)
    assert kv.match_prefix([*tokens, 0]).block_ids == (0, 1, 2)
    # Too short for any full block plus one.
    assert kv.match_prefix(tokens[:4]).block_ids == ()
    assert kv.match_prefix([]).block_ids == ()


def test_match_prefix_stops_at_first_miss() -> None:
    kv = _manager(num_blocks=8, block_size=2)
    _prefill(kv, "a", [1, 2, 3, 4, 5, 6, 7])
    assert kv.match_prefix([1, 2, 3, 4, 5, 6, 7]).block_ids == (0, 1, 2)
    assert kv.match_prefix([1, 2, 9, 4, 5, 6, 7]).block_ids == (0,)
    # Same tokens in block 2 but a different parent: a miss.
    assert kv.match_prefix([9, 9, 3, 4, 5]).block_ids == ()


def test_match_prefix_takes_no_reference() -> None:
    kv = _manager(num_blocks=4, block_size=2)
    _prefill(kv, "a", [1, 2, 3])
    _free(kv, "a")
    refcounts = list(kv.pool.refcount)
    order = kv.pool.free_order()
    assert kv.match_prefix([1, 2, 3]).block_ids == (0,)
    assert kv.pool.refcount == refcounts
    assert kv.pool.free_order() == order


# ---- admit / grow --------------------------------------------------------------------------


def test_admit_fresh_sequence_allocates_in_order() -> None:
    kv = _manager(num_blocks=6, block_size=4)
    match = kv.match_prefix(list(range(10)))
    assert match.block_ids == ()
    assert kv.admit("a", match, 10, num_prompt=10)
    assert kv.has("a")
    assert kv.block_table("a") == [0, 1, 2]
    assert kv.num_free_blocks == 3
    assert kv.pool.free_order() == [3, 4, 5]
    kv.check_integrity()


def test_admit_is_all_or_nothing_when_blocks_are_short() -> None:
    kv = _manager(num_blocks=4, block_size=4)
    assert kv.admit("a", kv.match_prefix([1] * 8), 8, num_prompt=8)
    order = kv.pool.free_order()
    assert order == [2, 3]
    assert not kv.admit("b", kv.match_prefix([2] * 9), 9, num_prompt=9)  # needs 3 blocks
    assert not kv.has("b")
    assert kv.pool.free_order() == order
    assert kv.pool.refcount == [1, 1, 0, 0]
    assert kv.prefix_cache_queried_tokens == 8
    assert kv.prefix_cache_hit_tokens == 0
    kv.check_integrity()
    # Exactly enough: admitted.
    assert kv.admit("b", kv.match_prefix([2] * 8), 8, num_prompt=8)
    assert kv.block_table("b") == [2, 3]
    kv.check_integrity()


def test_admit_counts_revived_cached_blocks_against_free_list() -> None:
    kv = _manager(num_blocks=4, block_size=4)
    prompt = list(range(1, 10))  # 9 tokens: blocks 0, 1 full, block 2 partial
    _prefill(kv, "a", prompt)
    assert len(kv.index) == 2
    _free(kv, "a")
    order = kv.pool.free_order()
    assert order == [3, 2, 1, 0]
    index_items = kv.index.items()
    longer = prompt[:8] + list(range(50, 62))  # 20 tokens: 5 blocks, 2 of them cached
    match = kv.match_prefix(longer)
    assert match.block_ids == (0, 1)
    # 3 new blocks are needed but only 2 blocks are free besides the 2 revived ones.
    assert not kv.admit("b", match, len(longer), num_prompt=len(longer))
    assert not kv.has("b")
    assert kv.pool.free_order() == order
    assert kv.pool.refcount == [0, 0, 0, 0]
    assert kv.index.items() == index_items
    assert kv.prefix_cache_queried_tokens == 9
    assert kv.prefix_cache_hit_tokens == 0
    kv.check_integrity()
    # 16 tokens: 2 revived + 2 new blocks fit exactly.
    fits = longer[:16]
    match = kv.match_prefix(fits)
    assert kv.admit("b", match, len(fits), num_prompt=len(fits))
    assert kv.block_table("b") == [0, 1, 3, 2]
    assert kv.pool.free_order() == []
    assert kv.pool.refcount == [1, 1, 1, 1]
    assert kv.prefix_cache_queried_tokens == 9 + 16
    assert kv.prefix_cache_hit_tokens == 8
    kv.check_integrity()


def test_admit_twice_raises() -> None:
    kv = _manager()
    assert kv.admit("a", kv.match_prefix([1, 2]), 2, num_prompt=2)
    with pytest.raises(KVIntegrityError, match=r"admitted twice"):
        kv.admit("a", kv.match_prefix([1, 2]), 2, num_prompt=2)
    assert kv.block_table("a") == [0]


def test_grow_is_all_or_nothing() -> None:
    kv = _manager(num_blocks=3, block_size=2)
    assert kv.admit("a", kv.match_prefix([1, 2, 3]), 3, num_prompt=3)
    assert kv.block_table("a") == [0, 1]
    assert kv.grow("a", 4)  # still fits in 2 blocks
    assert kv.block_table("a") == [0, 1]
    assert not kv.grow("a", 7)  # would need 2 more blocks; only 1 free
    assert kv.block_table("a") == [0, 1]
    assert kv.pool.free_order() == [2]
    assert kv.grow("a", 6)
    assert kv.block_table("a") == [0, 1, 2]
    kv.check_integrity()


# ---- commit ---------------------------------------------------------------------------------


def test_commit_indexes_only_fully_computed_blocks() -> None:
    kv = _manager(num_blocks=6, block_size=4)
    tokens = list(range(10, 20))  # 10 tokens, 3 blocks
    assert kv.admit("a", kv.match_prefix(tokens), 10, num_prompt=10)
    table = kv.block_table("a")
    k0, k1 = _keys(tokens, 4)
    kv.commit("a", tokens, 3)
    assert len(kv.index) == 0
    kv.commit("a", tokens, 4)
    assert kv.index.items() == [(k0, table[0])]
    kv.commit("a", tokens, 7)
    assert len(kv.index) == 1
    kv.commit("a", tokens, 8)
    assert kv.index.items() == [(k0, table[0]), (k1, table[1])]
    kv.commit("a", tokens, 10)  # block 2 is partial: never indexed
    assert len(kv.index) == 2
    assert kv.index.key_of(table[2]) is None
    assert kv.index.lookup(k1, tokens[4:8]) == table[1]
    kv.check_integrity()
    # Committing again is idempotent.
    kv.commit("a", tokens, 10)
    assert len(kv.index) == 2
    kv.check_integrity()


def test_commit_after_decode_fills_block() -> None:
    kv = _manager(num_blocks=4, block_size=4)
    tokens = [1, 2, 3]
    _prefill(kv, "a", tokens)
    assert len(kv.index) == 0
    tokens = [*tokens, 4, 5]
    assert kv.grow("a", 5)
    kv.commit("a", tokens, 4)
    assert kv.index.items() == [(_keys(tokens, 4)[0], 0)]
    assert kv.block_table("a") == [0, 1]
    kv.check_integrity()


# ---- free and reuse ------------------------------------------------------------------------


def test_free_releases_tail_blocks_first() -> None:
    kv = _manager(num_blocks=6, block_size=4)
    _prefill(kv, "a", list(range(12)))
    assert kv.block_table("a") == [0, 1, 2]
    assert kv.pool.free_order() == [3, 4, 5]
    _free(kv, "a")
    assert not kv.has("a")
    assert kv.pool.free_order() == [3, 4, 5, 2, 1, 0]
    assert kv.pool.refcount == [0] * 6
    # Cached blocks stay indexed while free.
    assert len(kv.index) == 3
    kv.free("a")  # unknown: no-op
    assert kv.pool.free_order() == [3, 4, 5, 2, 1, 0]


def test_second_sequence_with_same_prefix_reuses_blocks() -> None:
    kv = _manager(num_blocks=8, block_size=4)
    prompt_a = list(range(100, 110))  # 10 tokens
    match_a = _prefill(kv, "a", prompt_a)
    assert match_a.num_tokens == 0
    assert kv.block_table("a") == [0, 1, 2]
    assert kv.prefix_cache_queried_tokens == 10
    assert kv.prefix_cache_hit_tokens == 0
    # While "a" still runs: shared blocks, refcount 2.
    prompt_b = [*prompt_a[:8], 7, 7, 7]  # 11 tokens, same 2 leading blocks
    match_b = _prefill(kv, "b", prompt_b)
    assert match_b.block_ids == (0, 1)
    assert match_b.num_tokens == 8
    assert kv.block_table("b") == [0, 1, 3]
    assert kv.pool.refcount[:4] == [2, 2, 1, 1]
    assert kv.prefix_cache_queried_tokens == 21
    assert kv.prefix_cache_hit_tokens == 8
    _free(kv, "a")
    assert kv.pool.refcount[:4] == [1, 1, 0, 1]
    assert kv.pool.free_order() == [4, 5, 6, 7, 2]
    _free(kv, "b")
    assert kv.pool.free_order() == [4, 5, 6, 7, 2, 3, 1, 0]
    # The same prompt once more, after both finished: the same blocks, revived.
    match_c = _prefill(kv, "c", prompt_a)
    assert match_c.block_ids == (0, 1)
    assert kv.block_table("c") == [0, 1, 4]
    assert kv.prefix_cache_queried_tokens == 31
    assert kv.prefix_cache_hit_tokens == 16
    assert kv.stats() == {
        "kv_blocks_total": 8,
        "kv_blocks_free": 5,
        "kv_blocks_cached": 2,
        "kv_block_size": 4,
        "prefix_cache_queried_tokens": 31,
        "prefix_cache_hit_tokens": 16,
    }


def test_identical_runs_give_identical_block_ids() -> None:
    def run() -> tuple[list[list[int]], dict[str, int]]:
        kv = _manager(num_blocks=8, block_size=4)
        tables = []
        for seq_id in ("a", "b"):
            _prefill(kv, seq_id, list(range(9)))
            tables.append(list(kv.block_table(seq_id)))
        return tables, kv.stats()

    first = run()
    assert first == run()
    assert first[0] == [[0, 1, 2], [0, 1, 3]]
    assert first[1]["prefix_cache_hit_tokens"] == 8
    assert first[1]["prefix_cache_queried_tokens"] == 18


def test_cached_free_blocks_evicted_in_lru_order() -> None:
    kv = _manager(num_blocks=4, block_size=2)
    _prefill(kv, "a", [1, 2, 3])  # blocks [0, 1]; block 0 indexed
    _free(kv, "a")
    _prefill(kv, "b", [5, 6, 7])  # blocks [2, 3]; block 2 indexed
    _free(kv, "b")
    key_a = _keys([1, 2], 2)[0]
    key_b = _keys([5, 6], 2)[0]
    assert kv.pool.free_order() == [1, 0, 3, 2]
    assert kv.index.items() == [(key_a, 0), (key_b, 2)]
    # Two fresh blocks: the least recently released ones, 1 and then 0 (a's cached block).
    assert kv.admit("c", kv.match_prefix([9, 9, 9]), 3, num_prompt=3)
    assert kv.block_table("c") == [1, 0]
    assert kv.index.key_of(0) is None
    assert kv.index.items() == [(key_b, 2)]
    assert kv.match_prefix([1, 2, 3]).block_ids == ()
    assert kv.match_prefix([5, 6, 7]).block_ids == (2,)
    kv.check_integrity()
    # One more fresh block: 3 (unindexed) goes before 2 (b's cached block).
    assert kv.admit("d", kv.match_prefix([8, 8]), 2, num_prompt=2)
    assert kv.block_table("d") == [3]
    assert kv.index.items() == [(key_b, 2)]
    # And the last one evicts b's block as well.
    assert kv.admit("e", kv.match_prefix([4, 4]), 2, num_prompt=2)
    assert kv.block_table("e") == [2]
    assert len(kv.index) == 0
    kv.check_integrity()


def test_prefix_hit_refreshes_recency() -> None:
    kv = _manager(num_blocks=4, block_size=2)
    _prefill(kv, "a", [1, 2, 3])  # [0, 1]
    _free(kv, "a")
    _prefill(kv, "b", [5, 6, 7])  # [2, 3]
    _free(kv, "b")
    assert kv.pool.free_order() == [1, 0, 3, 2]
    # A hit on a's block 0 revives it; freed again, it goes to the back.
    assert _prefill(kv, "a2", [1, 2, 3]).block_ids == (0,)
    assert kv.block_table("a2") == [0, 1]
    _free(kv, "a2")
    assert kv.pool.free_order() == [3, 2, 1, 0]
    assert kv.admit("c", kv.match_prefix([9, 9, 9]), 3, num_prompt=3)
    assert kv.block_table("c") == [3, 2]
    assert kv.match_prefix([5, 6, 7]).block_ids == ()
    assert kv.match_prefix([1, 2, 3]).block_ids == (0,)
    kv.check_integrity()


def test_prefix_caching_disabled_never_indexes_or_hits() -> None:
    kv = _manager(num_blocks=8, block_size=4, caching=False)
    prompt = list(range(10))
    match = _prefill(kv, "a", prompt)
    assert match.block_ids == ()
    assert len(kv.index) == 0
    assert kv.block_table("a") == [0, 1, 2]
    match = _prefill(kv, "b", prompt)
    assert match.block_ids == ()
    assert match.keys == ()
    assert kv.block_table("b") == [3, 4, 5]
    _free(kv, "a")
    _free(kv, "b")
    assert kv.match_prefix([*prompt, 0]).block_ids == ()
    assert len(kv.index) == 0
    assert kv.prefix_cache_queried_tokens == 0
    assert kv.prefix_cache_hit_tokens == 0
    assert kv.stats()["kv_blocks_cached"] == 0


# ---- integrity ----------------------------------------------------------------------------


def _busy_manager() -> KVManager:
    """Two running sequences sharing a prefix, one freed with cached blocks."""
    kv = _manager(num_blocks=8, block_size=2)
    _prefill(kv, "a", [1, 2, 3, 4, 5])  # [0, 1, 2]
    _prefill(kv, "b", [1, 2, 3, 4, 9])  # [0, 1, 3]
    _prefill(kv, "c", [7, 7, 7])  # [4, 5]
    _free(kv, "c")
    assert kv.pool.refcount == [2, 2, 1, 1, 0, 0, 0, 0]
    assert kv.pool.free_order() == [6, 7, 5, 4]
    return kv


def test_check_integrity_passes_in_every_state() -> None:
    kv = _busy_manager()
    kv.check_integrity()
    _free(kv, "a")
    _free(kv, "b")
    assert kv.num_free_blocks == 8
    kv.check_integrity()


def test_integrity_detects_refcount_too_high() -> None:
    kv = _busy_manager()
    kv.pool.refcount[2] += 1
    with pytest.raises(KVIntegrityError, match=r"block 2: refcount 2 but held by 1"):
        kv.check_integrity()


def test_integrity_detects_free_block_with_refcount() -> None:
    kv = _busy_manager()
    kv.pool.refcount[6] = 1
    with pytest.raises(KVIntegrityError) as err:
        kv.check_integrity()
    assert "block 6: refcount 1 but held by 0" in str(err.value)
    assert "block 6: refcount 1 but free=True" in str(err.value)


def test_integrity_detects_held_block_on_free_list() -> None:
    kv = _busy_manager()
    kv.pool._free[0] = None
    with pytest.raises(KVIntegrityError, match=r"block 0: refcount 2 but free=True"):
        kv.check_integrity()


def test_integrity_detects_unreferenced_block_off_free_list() -> None:
    kv = _busy_manager()
    del kv.pool._free[7]
    with pytest.raises(KVIntegrityError, match=r"block 7: refcount 0 but free=False"):
        kv.check_integrity()


def test_integrity_detects_duplicate_on_free_list(monkeypatch: pytest.MonkeyPatch) -> None:
    kv = _busy_manager()
    # The OrderedDict cannot hold a duplicate itself; corrupt the view the check reads.
    corrupt = [*kv.pool.free_order(), 6]
    monkeypatch.setattr(kv.pool, "free_order", lambda: corrupt)
    with pytest.raises(KVIntegrityError, match=r"free list holds a block twice"):
        kv.check_integrity()


def test_integrity_detects_block_held_twice_by_one_sequence() -> None:
    kv = _busy_manager()
    kv._seqs["a"].table.append(0)
    with pytest.raises(KVIntegrityError, match=r"sequence 'a' holds a block twice"):
        kv.check_integrity()


def test_integrity_detects_invalid_block_id() -> None:
    kv = _busy_manager()
    kv._seqs["a"].table.append(99)
    with pytest.raises(KVIntegrityError, match=r"sequence 'a' holds invalid block 99"):
        kv.check_integrity()


def test_integrity_detects_index_disagreement() -> None:
    kv = _busy_manager()
    kv.index._block_of[b"\0" * 32] = 5
    with pytest.raises(KVIntegrityError, match=r"prefix index has 4 keys but 3 blocks"):
        kv.check_integrity()


def test_integrity_detects_block_indexed_under_another_key() -> None:
    kv = _busy_manager()
    kv.index.remove_block(0)
    assert kv.index.insert(b"\1" * 32, [1, 2], 0)
    with pytest.raises(KVIntegrityError, match=r"sequence 'a' block 0 \(id 0\) is indexed under"):
        kv.check_integrity()


def test_integrity_error_is_strata_and_runtime_error() -> None:
    from strata.errors import StrataError

    assert issubclass(KVIntegrityError, StrataError)
    assert issubclass(KVIntegrityError, RuntimeError)


def test_integrity_passes_when_same_prompt_committed_twice() -> None:
    kv = _manager(num_blocks=8, block_size=2)
    prompt = [1, 2, 3]
    # Both admitted before either commits, as the scheduler does in one step.
    assert kv.admit("a", kv.match_prefix(prompt), 3, num_prompt=3)
    assert kv.admit("b", kv.match_prefix(prompt), 3, num_prompt=3)
    kv.commit("a", prompt, 3)
    kv.commit("b", prompt, 3)
    assert kv.index.items() == [(_keys(prompt, 2)[0], 0)]
    kv.check_integrity()
