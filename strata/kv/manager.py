"""KVManager: block tables of running sequences over one BlockPool and PrefixIndex.

For one sequence, with block size 4 and 10 tokens of which 7 are computed:

    tokens    | t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 .. .. |
    table     |  block 12   |  block 3    |  block 40   |
    computed  |<------- 7 ------->|
    indexed   |<-- 1 full -->|              block 3 fills up once t7 is computed

Invariants (checked by `check_integrity`):
- refcount(b) == number of block tables holding b; refcount(b) == 0 <=> b is on the free list.
- Only full blocks whose every token is computed are in the prefix index.
- A sequence's first `len(keys)` blocks are full and computed, with chain keys `keys`;
  each is indexed under its key, or unindexed when another block held that key first.
- Holds (session pins) own one reference on each of their blocks, like a sequence.
- Reuse around holes: blocks after a sequence's computed ones may already hold valid KV
  (`reused`: cached past a missing block, or loaded from a tier). Each is indexed under
  its own key, or unindexed when another block held that key first; the sequence computes
  only the holes before them (see `PrefixMatch`).
- A sequence under a KV policy stops being indexed at its compression point; compaction
  (`compact_table`) never writes into a block that is shared or indexed: it copies it.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from strata.errors import StrataError
from strata.kv.blocks import BlockPool
from strata.kv.pool_order import FreeBlockOrder
from strata.kv.prefix import BlockRef, PrefixIndex, chain_key, salted_root


class KVIntegrityError(StrataError, RuntimeError):
    """The block pool, block tables and prefix index disagree: a bug, never user error."""


class WriteThrough(Protocol):
    """The tiers below the pool, as the pool sees them (`TierManager` is one)."""

    def before_overwrite(self, block_id: int) -> None:
        """Return once no pending copy to a tier still reads `block_id`."""


@dataclass
class _SeqBlocks:
    table: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)  # chain keys of the first len(keys) blocks
    root: bytes = b""  # the chain's root: the engine's, or salted (prefix.salted_root)
    compressed: bool = False  # past a KV policy's compression point: never indexed again
    reused: list[int] = field(default_factory=list)  # ascending indices of valid blocks ahead


@dataclass(frozen=True)
class PrefixMatch:
    """Cached blocks found for a sequence's leading full blocks, and (matched with holes)
    the cached blocks after the first missing one. A block's key names its whole prefix,
    whether or not the blocks before it are resident, so its KV is exact wherever it is:

        blocks    | 0  1 | 2  3 | 4 | 5 | 6 .. |
        cached    | y  y | n  n | y | n | ...  |
        match     |<-  ->|       |<>|            block_ids (0, 1); ahead ((4, id),)
        computed  |      |<hole->|  |<->|<rest->   holes attend over every block before them
    """

    block_ids: tuple[int, ...]
    keys: tuple[bytes, ...]
    block_size: int
    root: bytes  # the chain's root (salted for a salted sequence)
    ahead: tuple[tuple[int, int], ...] = ()  # (block index, block id), ascending, after a hole
    holes: bool = False  # matched past holes: a tier may fill any block not matched

    @property
    def num_tokens(self) -> int:
        """Tokens of the leading run: where the sequence's computing starts."""
        return len(self.block_ids) * self.block_size

    @property
    def num_reused_tokens(self) -> int:
        """Tokens whose KV the match supplies, leading run and blocks ahead together."""
        return (len(self.block_ids) + len(self.ahead)) * self.block_size


class KVManager:
    """Allocates, shares and frees KV blocks for sequences; owns the prefix index.

    With `tiers`, every newly indexed block is listed for write-through
    (`take_newly_indexed`) and a cached block is overwritten only once its copy is done.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        root: bytes,
        enable_prefix_caching: bool = True,
        tiers: WriteThrough | None = None,
        reuse_holes: bool = False,
        eviction: FreeBlockOrder | None = None,
    ) -> None:
        """eviction: the order free cached blocks are reused in (default lru)."""
        self.block_size = block_size
        self.root = root
        self.enable_prefix_caching = enable_prefix_caching
        self.reuse_holes = reuse_holes  # the scheduler matches lossless sequences past holes
        self.pool = BlockPool(num_blocks, eviction)
        self.index = PrefixIndex()
        self._seqs: dict[str, _SeqBlocks] = {}
        self._holds: dict[str, list[int]] = {}
        self._tiers = tiers
        self.newly_indexed: list[tuple[int, BlockRef]] = []  # since the last take_newly_indexed
        self.prefix_cache_queried_tokens = 0
        self.prefix_cache_hit_tokens = 0

    # ---- queries -------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: str) -> list[int]:
        """The sequence's block ids, in token order. Read-only for callers."""
        return self._seqs[seq_id].table

    def has(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    # ---- prefix matching -----------------------------------------------------------------

    def match_prefix(
        self, token_ids: Sequence[int], salt: str | None = None, holes: bool = False
    ) -> PrefixMatch:
        """The longest run of leading full blocks found in the index. Takes no reference.

        With `holes`, the search goes on past missing blocks, and the cached blocks after
        them are the match's `ahead`. At least one token is always left to compute, so
        the step that finishes the prompt has logits to sample from. A salted sequence
        only finds blocks of its salt.
        """
        root = salted_root(self.root, salt)
        if not self.enable_prefix_caching:
            return PrefixMatch((), (), self.block_size, root)
        bs = self.block_size
        parent = root
        block_ids: list[int] = []
        keys: list[bytes] = []
        ahead: list[tuple[int, int]] = []
        for i in range((len(token_ids) - 1) // bs):
            chunk = token_ids[i * bs : (i + 1) * bs]
            parent = chain_key(parent, chunk)
            block_id = self.index.lookup(parent, chunk)
            if block_id is not None and len(block_ids) == i:
                block_ids.append(block_id)
                keys.append(parent)
            elif block_id is not None:
                ahead.append((i, block_id))
            elif not holes:
                break
        return PrefixMatch(tuple(block_ids), tuple(keys), bs, root, tuple(ahead), holes)

    def block_refs(self, token_ids: Sequence[int], start: int, parent: bytes) -> list[BlockRef]:
        """Keys and tokens of the full blocks from block `start` on, leaving one token to compute.

        `parent` is the key of block start-1 (the root for start 0).
        """
        bs = self.block_size
        refs = []
        for i in range(start, (len(token_ids) - 1) // bs):
            chunk = tuple(token_ids[i * bs : (i + 1) * bs])
            parent = chain_key(parent, chunk)
            refs.append(BlockRef(parent, chunk, i))
        return refs

    # ---- allocation ----------------------------------------------------------------------

    def admit(self, seq_id: str, match: PrefixMatch, num_tokens: int, num_prompt: int) -> bool:
        """Give a new sequence its cached blocks plus fresh blocks up to `num_tokens` and in
        the holes between the cached ones.

        All or nothing: returns False and changes nothing if the free blocks do not suffice.
        """
        if seq_id in self._seqs:
            raise KVIntegrityError(f"sequence {seq_id!r} admitted twice")
        ahead = dict(match.ahead)
        length = max(self.blocks_for(num_tokens), max(ahead, default=-1) + 1)
        reused = [*match.block_ids, *ahead.values()]
        num_new = length - len(reused)
        revived = sum(1 for b in reused if self.pool.refcount[b] == 0)
        if num_new > self.pool.num_free - revived:
            return False
        for block_id in reused:  # off the free list before any allocation can evict them
            self.pool.acquire(block_id)
            self.pool.order.reused(block_id)
        state = _SeqBlocks(root=match.root, reused=sorted(ahead))
        state.table.extend(match.block_ids)
        for i in range(len(match.block_ids), length):
            state.table.append(ahead[i] if i in ahead else self._allocate_block())
        state.keys.extend(match.keys)
        self._seqs[seq_id] = state
        if self.enable_prefix_caching:
            self.prefix_cache_queried_tokens += num_prompt
            self.prefix_cache_hit_tokens += match.num_reused_tokens
        return True

    def hole_end(self, seq_id: str) -> int | None:
        """The first token past the sequence's computed ones whose block already holds KV:
        computing stops there. None when no such block lies ahead."""
        reused = self._seqs[seq_id].reused
        return reused[0] * self.block_size if reused else None

    def skip_reused(self, seq_id: str, num_computed: int) -> int:
        """`num_computed` moved past the valid blocks that start there (the hole before
        them is filled); they leave `reused` and are indexed by the next `commit`."""
        reused = self._seqs[seq_id].reused
        while reused and reused[0] * self.block_size == num_computed:
            reused.pop(0)
            num_computed += self.block_size
        return num_computed

    def reused_ahead_tokens(self, seq_id: str) -> int:
        """Tokens of the valid blocks still ahead of the sequence's computed ones."""
        return len(self._seqs[seq_id].reused) * self.block_size

    def grow(self, seq_id: str, num_tokens: int) -> bool:
        """Extend a running sequence's table to hold `num_tokens`. All or nothing."""
        state = self._seqs[seq_id]
        num_new = self.blocks_for(num_tokens) - len(state.table)
        if num_new > self.pool.num_free:
            return False
        for _ in range(num_new):
            state.table.append(self._allocate_block())
        return True

    def _allocate_block(self) -> int:
        block_id = self.pool.allocate()
        self.evict_cached(block_id)  # its old contents are about to be overwritten
        return block_id

    def evict_cached(self, block_id: int) -> None:
        """Forget a free block's prefix entry: the one path by which cached KV leaves the GPU.

        With tiers, the block was written through when it was computed, so it stays
        findable below; this only waits if that copy is still reading the block.
        """
        if self._tiers is not None:
            self._tiers.before_overwrite(block_id)
        if self.index.remove_block(block_id) is not None:
            self.pool.order.forgotten(block_id)

    def commit(
        self, seq_id: str, token_ids: Sequence[int], num_computed: int, write_through: bool = True
    ) -> None:
        """Index the sequence's full blocks whose tokens are all computed.

        With tiers, newly indexed blocks are queued to be written through unless they
        came from a tier (`write_through=False`).
        """
        if not self.enable_prefix_caching:
            return
        state = self._seqs[seq_id]
        if state.compressed:
            return
        bs = self.block_size
        for i in range(len(state.keys), num_computed // bs):
            parent = state.keys[-1] if state.keys else state.root
            chunk = token_ids[i * bs : (i + 1) * bs]
            key = chain_key(parent, chunk)
            # If another sequence indexed the same content first, this block stays unindexed.
            indexed = self.index.insert(key, chunk, state.table[i])
            if indexed:
                self.pool.order.indexed(state.table[i], i)
            if indexed and write_through and self._tiers is not None:
                self.newly_indexed.append((state.table[i], BlockRef(key, tuple(chunk), i)))
            state.keys.append(key)

    def free(self, seq_id: str) -> None:
        """Drop the sequence's references, last block first.

        Releasing in reverse puts a sequence's tail blocks nearer the front of the free
        list, so they are evicted before its head blocks, which other requests share more.
        """
        state = self._seqs.pop(seq_id, None)
        if state is None:
            return
        for block_id in reversed(state.table):
            self.pool.release(block_id)

    def evict_all_cached(self) -> int:
        """Evict every free cached block from the GPU pool (a cold GPU cache); returns how many.

        With tiers the blocks stay findable below, as after any eviction.
        """
        evicted = 0
        for block_id in self.pool.free_order():
            if self.index.key_of(block_id) is not None:
                self.evict_cached(block_id)
                evicted += 1
        return evicted

    def take_newly_indexed(self) -> list[tuple[int, BlockRef]]:
        """(block id, ref) of blocks indexed since the last call: the ones to write through."""
        out, self.newly_indexed = self.newly_indexed, []
        return out

    def keys_of(self, seq_id: str) -> list[bytes]:
        """Chain keys of the sequence's full computed blocks."""
        return list(self._seqs[seq_id].keys)

    def mark_loaded(self, seq_id: str, loaded: Sequence[tuple[int, BlockRef]]) -> None:
        """Index blocks past the sequence's computed ones whose KV arrived from a tier.

        `loaded`: (block index, key and tokens), ascending; they are not hashed again and
        not written back down. They join the valid blocks ahead (`skip_reused`).
        """
        state = self._seqs[seq_id]
        for i, ref in loaded:
            if self.index.insert(ref.key, ref.token_ids, state.table[i]):
                self.pool.order.indexed(state.table[i], i)
            bisect.insort(state.reused, i)

    # ---- compaction under a KV policy ----------------------------------------------------

    def stop_indexing(self, seq_id: str) -> None:
        """The sequence passed its compression point: its blocks are never indexed again."""
        self._seqs[seq_id].compressed = True

    def must_copy(self, block_id: int) -> bool:
        """Compaction may not write into this block: another holder or the index needs it."""
        return self.pool.refcount[block_id] > 1 or self.index.key_of(block_id) is not None

    def cow_reserve(self, seq_id: str, head_blocks: int) -> int:
        """Blocks a compaction keeping `head_blocks` blocks must copy shared ones into."""
        table = self._seqs[seq_id].table
        return sum(1 for b in table[:head_blocks] if self.pool.refcount[b] > 1)

    def compact_table(
        self, seq_id: str, head_blocks: int, data_blocks: int
    ) -> tuple[list[int], list[int], list[tuple[int, int]]]:
        """Shrink a sequence's table to its first `head_blocks` blocks, for compaction.

        A head block that `must_copy` is replaced by a copy in a spare block (the table
        past its first `data_blocks`, which hold no KV yet) or a free one, so its cached
        contents stay valid; with neither, a block only the index needs leaves the index
        and is compacted in place (the scheduler reserves spares for shared blocks).
        Returns (old table, new table, [(copied block, its replacement)]). Every block
        left out is released but keeps its contents: the caller copies and moves the
        survivors before any block is allocated again. The sequence is never indexed again.
        """
        state = self._seqs[seq_id]
        old = list(state.table)
        spares = old[data_blocks:]
        new: list[int] = []
        copies: list[tuple[int, int]] = []
        for block_id in old[:head_blocks]:
            if not self.must_copy(block_id):
                new.append(block_id)
                continue
            if spares:
                target = spares.pop()
            elif self.pool.num_free:
                target = self._allocate_block()
            elif self.pool.refcount[block_id] == 1:
                self.evict_cached(block_id)
                new.append(block_id)
                continue
            else:
                raise KVIntegrityError(
                    f"compacting {seq_id!r}: no block to copy shared block {block_id} into "
                    "(the scheduler reserves them)"
                )
            copies.append((block_id, target))
            new.append(target)
        kept = set(new)
        for block_id in reversed(old):
            if block_id not in kept:
                self.pool.release(block_id)
        state.table = new
        state.keys = []
        state.compressed = True
        return old, new, copies

    # ---- holds (session pins) ------------------------------------------------------------

    def hold(self, owner: str, block_ids: Sequence[int]) -> None:
        """Keep these blocks resident for `owner` (one reference each) until `release`."""
        if owner in self._holds:
            raise KVIntegrityError(f"hold {owner!r} taken twice")
        for block_id in block_ids:
            self.pool.acquire(block_id)
        self._holds[owner] = list(block_ids)

    def release(self, owner: str) -> None:
        for block_id in reversed(self._holds.pop(owner, [])):
            self.pool.release(block_id)

    @property
    def num_held_blocks(self) -> int:
        return sum(len(b) for b in self._holds.values())

    # ---- lending blocks (MoE expert slots) -----------------------------------------------

    def withdraw(self, block_id: int) -> bool:
        """Take block_id out of the pool if it is free (its cached KV evicted first through
        `evict_cached`); False if a sequence holds it."""
        if not self.pool.is_free(block_id):
            return False
        self.evict_cached(block_id)
        self.pool.withdraw(block_id)
        return True

    def restore(self, block_id: int) -> None:
        """Give a withdrawn block back to the pool (empty: it is allocated first)."""
        self.pool.restore(block_id)

    def holders(self, block_ids: set[int]) -> list[str]:
        """Sequences whose tables hold any of block_ids."""
        return [s for s, st in self._seqs.items() if not block_ids.isdisjoint(st.table)]

    # ---- checks and stats ----------------------------------------------------------------

    def check_integrity(self) -> None:
        """Raise KVIntegrityError unless refcounts, free list and prefix index agree."""
        problems: list[str] = []
        held = [0] * self.pool.num_blocks
        for seq_id, state in self._seqs.items():
            if len(set(state.table)) != len(state.table):
                problems.append(f"sequence {seq_id!r} holds a block twice: {state.table}")
            for block_id in state.table:
                if not 0 <= block_id < self.pool.num_blocks:
                    problems.append(f"sequence {seq_id!r} holds invalid block {block_id}")
                else:
                    held[block_id] += 1
            for i, key in enumerate(state.keys):
                # A duplicate of already-indexed content stays unindexed; an indexed block
                # must be indexed under the key of the tokens this sequence put there.
                indexed_key = self.index.key_of(state.table[i])
                if indexed_key is not None and indexed_key != key:
                    problems.append(
                        f"sequence {seq_id!r} block {i} (id {state.table[i]}) is indexed "
                        "under another prefix's key"
                    )
            problems.extend(self._check_reused(seq_id, state))
        for owner, blocks in self._holds.items():
            for block_id in blocks:
                if not 0 <= block_id < self.pool.num_blocks:
                    problems.append(f"hold {owner!r} holds invalid block {block_id}")
                else:
                    held[block_id] += 1
        free = self.pool.free_order()
        if len(set(free)) != len(free):
            problems.append("free list holds a block twice")
        free_set = set(free)
        for block_id in range(self.pool.num_blocks):
            rc = self.pool.refcount[block_id]
            if rc != held[block_id]:
                problems.append(f"block {block_id}: refcount {rc} but held by {held[block_id]}")
            withdrawn = block_id in self.pool.withdrawn
            is_free = block_id in free_set
            if (rc == 0) != (is_free or withdrawn) or (withdrawn and is_free):
                problems.append(
                    f"block {block_id}: refcount {rc} but free={is_free} withdrawn={withdrawn}"
                )
        problems.extend(self.index.check())
        problems.extend(self.pool.order.check(free_set))
        if problems:
            raise KVIntegrityError("KV integrity check failed:\n  " + "\n  ".join(problems))

    def _check_reused(self, seq_id: str, state: _SeqBlocks) -> list[str]:
        """A valid block ahead lies past the computed keys, in the table, once."""
        problems = [
            f"sequence {seq_id!r} reused block {i} is out of place"
            for i in state.reused
            if not len(state.keys) < i < len(state.table)
        ]
        if state.reused != sorted(set(state.reused)):
            problems.append(f"sequence {seq_id!r} reused blocks {state.reused} not ascending")
        return problems

    def stats(self) -> dict[str, int]:
        return {
            "kv_blocks_total": self.pool.num_blocks - len(self.pool.withdrawn),
            "kv_blocks_free": self.pool.num_free,
            "kv_blocks_cached": len(self.index),
            "kv_block_size": self.block_size,
            "prefix_cache_queried_tokens": self.prefix_cache_queried_tokens,
            "prefix_cache_hit_tokens": self.prefix_cache_hit_tokens,
        }
