"""SimRequest: what the simulator knows of a request — lengths, block keys, when it comes.

Content is described by block keys only. `keys[i]` names tokens 0 .. (i+1)*block_size - 1
of prompt + output, chained like the engine's keys (strata/kv/prefix.py): two requests
share key i exactly when they share every token before its end. The first
`(prompt_len - 1) // block_size` keys are the prompt blocks a replica may reuse (one
token is always left to compute), as PromptKeys.chain counts them for the real front.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

_ROOT = 0x5EED


def chain(pieces: Sequence[Hashable]) -> tuple[int, ...]:
    """Chained keys, one per piece (a hashable description of one block's tokens). Python's
    hash of ints and tuples of ints is the same in every process (no hash salt)."""
    keys = []
    parent = _ROOT
    for piece in pieces:
        parent = hash((parent, piece))
        keys.append(parent)
    return tuple(keys)


def token_keys(ids: Sequence[int], block_size: int) -> tuple[int, ...]:
    """Keys of the full blocks of real token ids."""
    full = len(ids) // block_size
    return chain([tuple(ids[i * block_size : (i + 1) * block_size]) for i in range(full)])


def segment_keys(segments: Sequence[tuple[int, int]], block_size: int) -> tuple[int, ...]:
    """Keys of the full blocks of a text made of segments (segment id, length in tokens):
    token j of segment s stands for a distinct token (s, j)."""
    pieces: list[tuple[tuple[int, int, int], ...]] = []
    block: list[tuple[int, int, int]] = []
    room = block_size
    for seg, length in segments:
        start = 0
        while start < length:
            take = min(room, length - start)
            block.append((seg, start, start + take))
            start += take
            room -= take
            if room == 0:
                pieces.append(tuple(block))
                block, room = [], block_size
    return chain(pieces)


@dataclass(frozen=True)
class SimRequest:
    id: int
    arrival_s: float  # when sent; a follow-up turn: think time after its previous turn ends
    prompt_len: int
    output_len: int
    keys: tuple[int, ...]  # full blocks of prompt + output (see the module docstring)
    follows: int | None = None  # the request id whose end releases this one (a chat turn)

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(
                f"request {self.id}: prompt and output need >= 1 token, got "
                f"{self.prompt_len} and {self.output_len}"
            )
        if not self.arrival_s >= 0:
            raise ValueError(f"request {self.id}: arrival must be >= 0 s, got {self.arrival_s}")

    def prompt_keys(self, block_size: int) -> tuple[int, ...]:
        return self.keys[: (self.prompt_len - 1) // block_size]
