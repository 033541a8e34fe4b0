"""TierStore: the interface every KV tier below the GPU implements.

A tier maps block keys (the prefix cache's chained SHA-256 keys, 32 bytes) to stored
blocks. Tiers are ordered (cpu -> disk -> remote); the `TierManager` promotes a hit
from a lower tier into the ones above it. Every method is called from the KV mover
thread only, except `contains` on local tiers (`is_local`), which the scheduler may call
too, so
local implementations guard their index with a lock.

Invariants every implementation keeps:
- `get` never returns a block whose header, key or checksum does not match: such a
  block is a miss, is removed, and is counted in `stats().corrupt`.
- A pinned key is never evicted; `pin` on a missing key is a no-op.
- `used_bytes <= capacity_bytes` after every call.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields

import torch

KEY_BYTES = 32


@dataclass(frozen=True)
class BlockLayout:
    """What one stored block holds; two engines share blocks only if their layouts match."""

    fingerprint: str  # model weights fingerprint (hex SHA-256)
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int  # tokens per block
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"
    codec: str = "raw"  # BlockCodec.layout_name (strata/kv/codec.py)

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """Payload shape of a raw block: [layers, k|v, tokens, kv heads, head dim], contiguous.
        A coded block is its codec's parts in order, layer after layer."""
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        from strata.kv.codec import BlockShape, codec_for_layout

        shape = BlockShape(self.block_size, self.num_kv_heads, self.head_dim)
        codec = codec_for_layout(self.codec)
        return codec.bytes_per_block(self.num_layers, shape, self.torch_dtype)


@dataclass
class StoredBlock:
    """One full block's KV for all layers, as it travels between tiers.

    payload is a contiguous uint8 CPU tensor of `layout.nbytes` bytes laid out as
    `layout.shape`; it may be a view into a tier's memory, valid until the next call
    into that tier. position: the block's index in its prefix, None when unknown.
    """

    key: bytes
    token_ids: tuple[int, ...]
    payload: torch.Tensor
    position: int | None = None


@dataclass
class TierStats:
    """Counters of one tier; bytes/s are derived from bytes and the seconds spent moving them."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0  # blocks found but rejected (header, key or checksum mismatch)
    bytes_read: int = 0
    bytes_written: int = 0
    read_seconds: float = 0.0
    write_seconds: float = 0.0
    evictions: int = 0
    errors: int = 0  # failed I/O (e.g. remote unreachable); the block counts as a miss
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, value in deltas.items():
                setattr(self, name, getattr(self, name) + value)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_lock"}
        out["read_bytes_per_s"] = (
            out["bytes_read"] / out["read_seconds"] if out["read_seconds"] else 0.0
        )
        out["write_bytes_per_s"] = (
            out["bytes_written"] / out["write_seconds"] if out["write_seconds"] else 0.0
        )
        return out


class PinCounts:
    """Nested pins per key: a key is pinned while more pins than unpins reached it.

    Not thread-safe: each tier calls it under its own index lock.
    """

    def __init__(self) -> None:
        self._count: Counter[bytes] = Counter()  # only keys with a count > 0

    def add(self, keys: Iterable[bytes]) -> None:
        for key in keys:
            self._count[key] += 1

    def drop(self, keys: Iterable[bytes]) -> None:
        """One unpin per key; unpinning a key that is not pinned does nothing."""
        for key in keys:
            if self._count[key] > 1:
                self._count[key] -= 1
            else:
                del self._count[key]

    def forget(self, key: bytes) -> None:
        """Drop every pin of a key (its block is gone)."""
        self._count.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._count

    def __len__(self) -> int:
        return len(self._count)

    def keys(self) -> set[bytes]:
        return set(self._count)


class LockedPins:
    """`pin`, `unpin` and `is_pinned` of a local tier that counts its pins in `_pins`
    under its index lock `_lock`; the tier says which keys it stores (`_stores`)."""

    _lock: threading.Lock
    _pins: PinCounts

    def _stores(self, key: bytes) -> bool:
        raise NotImplementedError

    def pin(self, keys: Sequence[bytes]) -> None:
        with self._lock:
            self._pins.add(k for k in keys if self._stores(k))

    def unpin(self, keys: Sequence[bytes]) -> None:
        with self._lock:
            self._pins.drop(keys)

    def is_pinned(self, key: bytes) -> bool:
        return key in self._pins


class Timer:
    """`with Timer() as t: ...; t.seconds`."""

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


class TierStore(ABC):
    """A capacity-bounded key -> block store with pins and a pluggable eviction order.

    `read_batch`: how many keys a reader asks for at once (a tier that reads in parallel
    wants several per thread).
    `is_local`: whether `contains` is cheap enough for the scheduler to call while it
    admits a sequence. A store that is not (one across the network) is probed ahead, on
    the io thread, when the sequence arrives.
    """

    name: str
    is_local: bool = True
    read_batch: int = 8  # keys per `get_into` call from the lower-tier reader (lower.py)

    def __init__(self, layout: BlockLayout, capacity_bytes: int) -> None:
        if capacity_bytes < layout.nbytes:
            raise ValueError(
                f"the {self.name} tier's capacity ({capacity_bytes} bytes) is smaller than one "
                f"block ({layout.nbytes} bytes)"
            )
        self.layout = layout
        self.capacity_bytes = capacity_bytes
        self.stats = TierStats()

    @property
    def capacity_blocks(self) -> int:
        return self.capacity_bytes // self.layout.nbytes

    @abstractmethod
    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether each key is stored (a cheap check; `get` still validates)."""

    @abstractmethod
    def get(self, keys: Sequence[bytes]) -> list[StoredBlock | None]:
        """The blocks, or None for a miss (absent, corrupt or unreachable)."""

    def get_into(
        self, keys: Sequence[bytes], dests: Sequence[torch.Tensor]
    ) -> list[StoredBlock | None]:
        """`get`, with each hit's payload in `dests[i]` (a contiguous uint8 CPU tensor of
        `layout.nbytes`, e.g. a cpu tier slot), which is the returned payload. A miss may
        leave its destination written. Tiers that can read in place override this."""
        out: list[StoredBlock | None] = []
        for dest, block in zip(dests, self.get(keys), strict=True):
            if block is not None:
                dest.copy_(block.payload.reshape(-1))
                block = StoredBlock(block.key, block.token_ids, dest, block.position)
            out.append(block)
        return out

    @abstractmethod
    def put(self, blocks: Sequence[StoredBlock]) -> None:
        """Store blocks, evicting unpinned ones in eviction order to make room.

        A block that cannot be stored (everything pinned, I/O error) is skipped.
        """

    @abstractmethod
    def pin(self, keys: Sequence[bytes]) -> None:
        """Exclude these keys from eviction until `unpin` (pins nest: a count per key)."""

    @abstractmethod
    def unpin(self, keys: Sequence[bytes]) -> None: ...

    @abstractmethod
    def remove(self, keys: Sequence[bytes]) -> None:
        """Drop blocks (pinned or not); absent keys are ignored."""

    @abstractmethod
    def evict(self, num_bytes: int) -> int:
        """Evict unpinned blocks in eviction order until `num_bytes` are free; bytes freed."""

    @property
    @abstractmethod
    def used_bytes(self) -> int: ...

    def check_integrity(self) -> list[str]:
        """Problems with the tier's own bookkeeping (empty when consistent)."""
        return []

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (files, sockets); the tier is unusable after."""

    def describe(self) -> str:
        return f"{self.name} {self.capacity_bytes / (1 << 30):.2f} GiB"
