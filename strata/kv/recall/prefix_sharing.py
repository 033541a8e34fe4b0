"""PrefixSharing: recall sequences whose prompts start alike share those blocks in the
host store, and a later one does not compute them again.

    plan     a request's full prompt blocks get their chained keys (strata/kv/prefix.py:
             the engine's root, salted by the request's cache_salt, which carries its
             tenant), so partitions never meet
    admit    the leading blocks the store has published are reused: the sequence holds
             references on their two slots instead of new ones, rebuilds its GPU state
             from them (prefix_copy.py) and computes from the first block after them
    commit   after the step that computed its prompt, its full prompt blocks are
             published (a key published already keeps its first copy)

    prompt   | reused: published, held by reference | computed ............ | open |
             0                                 reused * bs          prompt_tokens
                                  at most (prompt_tokens - 1) // block_size blocks:
                                  the last prompt token is always computed (its logits)

Under tensor parallelism sharing is off (build.py): the workers mirror rank 0's
admissions by serial, and their stores, whose slot numbers are their own, hold no index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from strata.kv.prefix import BlockRef, chain_key, salted_root
from strata.kv.recall.host_store import HostKVStore
from strata.kv.recall.published import PublishedBlock

if TYPE_CHECKING:
    from strata.kv.recall.sequence import RecallSequence


class PrefixSharing:
    def __init__(self, root: bytes, block_size: int) -> None:
        self.root, self.block_size = root, block_size  # the engine's chain root (unsalted)

    def prompt_blocks(self, prompt: Sequence[int], salt: str | None) -> tuple[BlockRef, ...]:
        """Keys and tokens of the prompt's full blocks, in its cache partition."""
        bs, parent = self.block_size, salted_root(self.root, salt)
        refs = []
        for i in range(len(prompt) // bs):
            tokens = tuple(prompt[i * bs : (i + 1) * bs])
            parent = chain_key(parent, tokens)
            refs.append(BlockRef(parent, tokens, i))
        return tuple(refs)

    def reusable(
        self, store: HostKVStore, blocks: tuple[BlockRef, ...], prompt_tokens: int
    ) -> list[PublishedBlock]:
        """The published blocks a sequence of this prompt reuses: the leading ones found,
        leaving at least its last token to compute."""
        return store.leading(blocks[: (prompt_tokens - 1) // self.block_size])

    def publish(
        self, store: HostKVStore, blocks: tuple[BlockRef, ...], state: RecallSequence
    ) -> int:
        """Index the full prompt blocks of a sequence that computed its prompt (its last
        chunk wrote every layer of them: prefix_copy.py), from then on never written
        again; how many were not indexed already."""
        if len(state.key_slots) < len(blocks):
            raise RuntimeError(f"recall sequence {state.owner!r} gave its keys back unpublished")
        keys, values = state.key_slots, state.value_slots
        published = store.publish(state.owner, [
            PublishedBlock(ref.key, ref.token_ids, keys[b], values[b])
            for b, ref in enumerate(blocks)
        ])  # fmt: skip
        state.on_host = max(state.on_host, len(blocks))
        return published
