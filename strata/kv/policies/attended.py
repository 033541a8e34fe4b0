"""Attended blocks: the KV one layer of a sequence attends over in one step.

Recall policies keep a sequence's whole KV and pick, before each step, the blocks each
layer attends over (`KVPolicy.attended_blocks`). Nothing is compacted and nothing is
freed: the step's tokens are still written to the sequence's own table, and the picked
table ends with the blocks that hold them.

    own table      | b0 | b1 | b2 | b3 | b4 | b5 |    chunk: slots 21, 22 (bs = 4, in b5)
    attended       | b0 | b3 | b5 |                    context_len = 2 * 4 + 3 = 11
    virtual slots    0-3  4-7  8-10                     the chunk: virtual slots 9, 10

- Virtual slot j is slot j % block_size of block_table[j // block_size]; the first
  context_len virtual slots are attended.
- The chunk's tokens are the last num_tokens virtual slots, and those are the physical
  slots the step writes them to. Attention is causal over virtual slots: each query sees
  every earlier slot of the picked blocks and itself.
- Layers given the same AttendedBlocks object share one attention metadata per step.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttendedBlocks:
    """The first `context_len` virtual slots of `block_table` (see the module docstring)."""

    block_table: list[int]
    context_len: int


@dataclass(frozen=True)
class ChunkSlots:
    """Where the tokens one step computes for a sequence go.

    Tokens [start, start + num_tokens) take slots [first_slot, first_slot + num_tokens)
    of the sequence's longest layer, in its own `block_table`."""

    start: int
    num_tokens: int
    first_slot: int
    block_table: list[int]
    block_size: int

    def attend_blocks(self, earlier: list[int]) -> AttendedBlocks:
        """Attend over the own blocks at indices `earlier` (ascending, each before the
        chunk's first block), then the blocks that hold the chunk."""
        bs, first = self.block_size, self.first_slot
        end = first + self.num_tokens
        head = first // bs
        if any(i >= head for i in earlier):
            raise ValueError(f"blocks {earlier} reach the chunk's first block {head}")
        tail = self.block_table[head : -(-end // bs)]
        table = [self.block_table[i] for i in earlier] + tail
        return AttendedBlocks(table, len(earlier) * bs + end - head * bs)
