"""TierManager: the GPU block pool's link to the tiers below it, off the engine thread.

    engine thread                 mover thread (device <-> cpu)     io thread (cpu <-> disk/remote)
    -------------                 -----------------------------     -------------------------------
    store(blocks) ---------------> gather, D2H into cpu slots ----> write-through to disk, remote
    start_load(seq) -- in cpu ---> H2D, scatter into the pool
                    \\- below ----------------------------------->  read, verify, promote to cpu
                                  H2D, scatter <------------------/
    probe_remote(seq) ------------------------------------------->  EXISTS on the remote
    poll() <-------------------------- completions ------------------------------/

Every full block the engine computes is written through: to the cpu tier at once and
from there to disk and remote, so a block the GPU pool evicts already lives below. The
engine never waits on a tier, with one exception: before overwriting a pool block whose
store is still being gathered (`before_overwrite`), which takes one copy at most.

Invariants:
- A block id in `_pending_store` is read by the mover; the pool must not reuse it until
  its event is set.
- Keys handed to the mover for a load are pinned in the cpu tier until it has copied
  them, so they cannot be evicted in between.
- `poll` reports each load exactly once, with how many of its leading blocks arrived; a
  load's destination blocks belong to its sequence until then.

The threads' jobs and reports are the frozen dataclasses of `jobs.py`; reads and writes
of the disk and remote tiers are in `lower.py`.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from strata.kv.cache import KVCache
from strata.kv.codec import codec_for_layout
from strata.kv.prefix import BlockRef
from strata.kv.tiers.base import TierStore, Timer
from strata.kv.tiers.cpu import CPUTier
from strata.kv.tiers.jobs import (
    STOP,
    FenceJob,
    HoldJob,
    IOJob,
    LoadDone,
    LoadJob,
    LoadProgress,
    MoverJob,
    ProbeDone,
    ProbeJob,
    ReleaseJob,
    StopJob,
    StoreJob,
    TierEvent,
    WriteJob,
)
from strata.kv.tiers.lower import LowerTiers
from strata.kv.tiers.transfer import BlockTransfer

logger = logging.getLogger("strata.kv.tiers")

Job = TypeVar("Job")


class TierManager:
    def __init__(
        self,
        kv_cache: KVCache,
        cpu: CPUTier,
        lower: Sequence[TierStore],
        max_write_backlog: int | None = None,
    ) -> None:
        self.cpu = cpu
        self.lower = LowerTiers(cpu, lower)
        self.local = [cpu, *(t for t in lower if t.is_local)]
        self.remote = next((t for t in lower if not t.is_local), None)
        # The slots hold the layout's codec: the pool's own, or a tier codec (slot_codec.py).
        self.transfer = BlockTransfer(kv_cache, cpu.slab, codec_for_layout(cpu.layout.codec))
        self.max_write_backlog = max_write_backlog or max(1, cpu.capacity_blocks // 2)
        self._pending_store: dict[int, threading.Event] = {}
        self._holds: dict[str, list[bytes]] = {}
        self._mover_q: queue.Queue[MoverJob] = queue.Queue()
        self._io_q: queue.PriorityQueue[tuple[int, int, IOJob]] = queue.PriorityQueue()
        self._io_seq = itertools.count()  # FIFO among equal priorities
        self._done: queue.SimpleQueue[TierEvent] = queue.SimpleQueue()
        self._done_event = threading.Event()
        self._write_backlog = 0
        self._backlog_lock = threading.Lock()
        self.num_stored = 0
        self.num_store_skipped = 0  # blocks not written through: backlog full or cpu all pinned
        self.num_loaded_blocks = 0
        self.num_failed_loads = 0
        self._failure: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._run_mover, name="strata-kv-mover", daemon=True),
            threading.Thread(target=self._run_io, name="strata-kv-io", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @property
    def tiers(self) -> list[TierStore]:
        return [self.cpu, *self.lower.tiers]

    def describe(self) -> str:
        return " -> ".join(t.describe() for t in self.tiers)

    # ---- engine thread --------------------------------------------------------------------

    def find_local(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether some local tier (cpu or disk) holds each key."""
        found = [False] * len(keys)
        for tier in self.local:
            rest = [i for i, f in enumerate(found) if not f]
            if not rest:
                break
            for i, hit in zip(rest, tier.contains([keys[i] for i in rest]), strict=True):
                found[i] = hit
        return found

    def probe_remote(self, seq_id: str, keys: Sequence[bytes]) -> None:
        """Ask the remote tier which keys it holds; answered by a ProbeDone from `poll`."""
        self._io_put(0, ProbeJob(seq_id, tuple(keys)))

    def start_load(self, seq_id: str, blocks: Sequence[BlockRef], block_ids: Sequence[int]) -> None:
        """Copy these blocks, found in some tier, into the pool blocks `block_ids`."""
        keys = [b.key for b in blocks]
        pinned = self.cpu.pin_present(keys)
        job = LoadJob(LoadProgress(seq_id), tuple(blocks), tuple(block_ids), tuple(pinned))
        if len(pinned) == len(keys):
            self._mover_q.put(job)
        else:
            self._io_put(0, job)

    def store(
        self, blocks: Sequence[BlockRef], block_ids: Sequence[int], after: Any = None
    ) -> None:
        """Write these freshly computed pool blocks through to every tier."""
        if not blocks:
            return
        done = threading.Event()
        for block_id in block_ids:
            self._pending_store[block_id] = done
        self._mover_q.put(StoreJob(tuple(blocks), tuple(block_ids), after, done))

    def written(self) -> threading.Event:
        """An event set once every block stored before this call is written through to
        the lower tiers (or skipped: backlog full, or already there). Any thread may call
        it; a store the engine thread queued before it is ordered before it."""
        done = threading.Event()
        self._mover_q.put(FenceJob(done))
        return done

    def before_overwrite(self, block_id: int) -> None:
        """Wait until a pending store has read `block_id` (the pool is about to reuse it)."""
        done = self._pending_store.pop(block_id, None)
        if done is not None:
            done.wait()

    def hold(self, owner: str, keys: Sequence[bytes]) -> None:
        """Pin these keys in the cpu tier for `owner` (after every store queued before)."""
        self._mover_q.put(HoldJob(owner, tuple(keys)))

    def release(self, owner: str) -> None:
        self._mover_q.put(ReleaseJob(owner))

    def wait(self, timeout_s: float) -> None:
        """Block until a load or probe completes or `timeout_s` passes."""
        self._done_event.wait(timeout_s)

    def _post(self, event: TierEvent) -> None:
        self._done.put(event)
        self._done_event.set()

    def poll(self) -> list[TierEvent]:
        """Completed loads and probes since the last poll; raises if a mover thread died."""
        if self._failure is not None:
            raise RuntimeError("the KV tier mover failed") from self._failure
        out: list[TierEvent] = []
        self._done_event.clear()
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                return out

    def flush(self) -> None:
        """Wait until every queued store, load and write-through has finished."""
        while True:
            self._mover_q.join()
            self._io_q.join()
            if self._mover_q.empty() and self._io_q.empty():
                return

    def close(self, flush: bool = True) -> None:
        if flush and self._failure is None:
            self.flush()
        self._mover_q.put(STOP)
        self._io_put(9, STOP)
        for thread in self._threads:
            thread.join(timeout=10)
        for tier in self.tiers:
            tier.close()

    # ---- both threads ---------------------------------------------------------------------

    def _run_mover(self) -> None:
        q = self._mover_q
        self._serve(q.get, self._mover_job, q.task_done, "KV tier job failed")

    def _run_io(self) -> None:
        q = self._io_q
        self._serve(lambda: q.get()[2], self._io_job, q.task_done, "KV tier I/O job failed")

    def _serve(
        self,
        take: Callable[[], Job],
        handle: Callable[[Job], None],
        task_done: Callable[[], None],
        failure: str,
    ) -> None:
        """Run jobs until a StopJob; a failed job is logged and kept for `poll` to raise."""
        while True:
            job = take()
            try:
                if isinstance(job, StopJob):
                    return
                handle(job)
            except BaseException as exc:  # keep serving; the engine sees it on the next poll
                logger.exception(failure)
                self._failure = exc
            finally:
                task_done()

    # ---- mover thread ---------------------------------------------------------------------

    def _mover_job(self, job: MoverJob) -> None:
        if isinstance(job, StoreJob):
            self._do_store(job)
        elif isinstance(job, LoadJob):
            self._do_load(job)
        elif isinstance(job, HoldJob):
            self._holds.setdefault(job.owner, []).extend(self.cpu.pin_present(job.keys))
        elif isinstance(job, ReleaseJob):
            self.cpu.unpin(self._holds.pop(job.owner, []))
        elif isinstance(job, FenceJob):
            self._io_put(1, job)  # behind the WriteJobs of the stores before it

    def _do_store(self, job: StoreJob) -> None:
        try:
            present = self.cpu.contains([b.key for b in job.blocks])
            todo = [(b, i) for b, i, p in zip(job.blocks, job.block_ids, present, strict=True)
                    if not p]  # fmt: skip
            slots: list[int] = []
            for _ in todo:
                slot = self.cpu.reserve()
                if slot is None:
                    break
                slots.append(slot)
            self.num_store_skipped += len(todo) - len(slots)
            todo = todo[: len(slots)]
            if todo:
                with Timer() as t:
                    try:
                        self.transfer.store([i for _, i in todo], slots, job.after)
                    except BaseException:
                        for slot in slots:  # never published: give them back
                            self.cpu.release_slot(slot)
                        raise
                nbytes = len(todo) * self.cpu.layout.nbytes
                self.cpu.stats.add(bytes_written=nbytes, write_seconds=t.seconds)
        finally:
            job.done.set()
            for block_id in job.block_ids:
                if self._pending_store.get(block_id) is job.done:
                    self._pending_store.pop(block_id, None)
        for (block, _), slot in zip(todo, slots, strict=True):
            self.cpu.publish(block.key, block.token_ids, slot, block.position)
        self.num_stored += len(todo)
        if self.lower.tiers and todo:
            self._write_through([b for b, _ in todo])

    def _write_through(self, blocks: list[BlockRef]) -> None:
        with self._backlog_lock:
            room = max(0, self.max_write_backlog - self._write_backlog)
            blocks, skipped = blocks[:room], len(blocks) - room
            self._write_backlog += len(blocks)
        self.num_store_skipped += max(0, skipped)
        if blocks:
            pinned = set(self.cpu.pin_present([b.key for b in blocks]))
            self._io_put(1, WriteJob(tuple(b for b in blocks if b.key in pinned), len(blocks)))

    def _do_load(self, job: LoadJob) -> None:
        progress = job.progress
        slots: list[int] = []
        if not progress.reported:  # parts after a failed one are not loaded: only unpinned
            for block in job.blocks:
                slot = self.cpu.slot_of(block.key)
                if slot is None:
                    break
                slots.append(slot)
        try:
            if slots:
                with Timer() as t:
                    self.transfer.load(slots, job.block_ids[: len(slots)])
                hits = self.cpu.get([b.key for b in job.blocks[: len(slots)]])  # counts hits, LRU
                nbytes = len(hits) * self.cpu.layout.nbytes
                self.cpu.stats.add(bytes_read=nbytes, read_seconds=t.seconds)
        finally:
            self.cpu.unpin(job.pinned)
        self.num_loaded_blocks += len(slots)
        progress.loaded += len(slots)
        if progress.reported:
            return
        if len(slots) < len(job.blocks) or job.last:
            if len(slots) < len(job.blocks):
                self.num_failed_loads += 1
            progress.reported = True
            self._post(LoadDone(progress.seq_id, progress.loaded))

    # ---- io thread ------------------------------------------------------------------------

    def _io_put(self, priority: int, job: IOJob) -> None:
        self._io_q.put((priority, next(self._io_seq), job))

    def _io_job(self, job: IOJob) -> None:
        if isinstance(job, LoadJob):
            self._fetch_below(job)
        elif isinstance(job, ProbeJob):
            keys = job.keys
            found = self.remote.contains(keys) if self.remote is not None else [False] * len(keys)
            self._post(ProbeDone(job.seq_id, tuple(found)))
        elif isinstance(job, FenceJob):
            job.done.set()
        elif isinstance(job, WriteJob):
            try:
                self.lower.write(job.blocks)
            finally:
                self.cpu.unpin([b.key for b in job.blocks])
                with self._backlog_lock:
                    self._write_backlog -= job.backlog

    def _fetch_below(self, job: LoadJob) -> None:
        """Bring the job's blocks up into the cpu tier and hand them to the mover in parts.

        Part i+1 is read while the mover copies part i to the pool. Reading stops at the
        first block no tier holds intact; that part is the last. Each part carries the cpu
        pins of its own keys (the last one also those of every key after it).
        """
        pinned = set(job.pinned)
        try:
            self._fetch_parts(job, pinned)
        except Exception:  # a tier bug must not leave the sequence loading forever
            logger.exception("reading KV blocks from the lower tiers failed; recomputing")
            self._mover_q.put(LoadJob(job.progress, (), (), tuple(pinned), last=True))

    def _fetch_parts(self, job: LoadJob, pinned: set[bytes]) -> None:
        n = len(job.blocks)
        for lo in range(0, n, self.transfer.chunk):
            hi = min(n, lo + self.transfer.chunk)
            blocks = job.blocks[lo:hi]
            fetched = self.lower.read([b for b in blocks if self.cpu.slot_of(b.key) is None])
            pinned.update(fetched)
            avail = 0
            while avail < len(blocks) and self.cpu.slot_of(blocks[avail].key) is not None:
                avail += 1
            last = avail < len(blocks) or hi == n
            keys = {b.key for b in (job.blocks[lo:] if last else blocks)}
            part_pins = tuple(k for k in pinned if k in keys)
            pinned.difference_update(part_pins)
            part = LoadJob(job.progress, blocks[:avail], job.block_ids[lo : lo + avail], part_pins,
                           last)  # fmt: skip
            self._mover_q.put(part)
            if last:
                return

    # ---- checks and stats -----------------------------------------------------------------

    def check_integrity(self) -> list[str]:
        """Problems in the tiers' bookkeeping; call only when the manager is idle (flushed)."""
        problems: list[str] = []
        for tier in self.tiers:
            problems.extend(tier.check_integrity())
        held = {k for keys in self._holds.values() for k in keys}
        if self.cpu.num_pinned != len(held):
            pinned = self.cpu.num_pinned
            problems.append(f"cpu tier: {pinned} pinned blocks, holds account for {len(held)}")
        return problems

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kv_tier_blocks_stored": self.num_stored,
            "kv_tier_blocks_store_skipped": self.num_store_skipped,
            "kv_tier_blocks_loaded": self.num_loaded_blocks,
            "kv_tier_partial_loads": self.num_failed_loads,
        }
        for tier in self.tiers:
            for name, value in tier.stats.snapshot().items():
                out[f"kv_tier_{tier.name}_{name}"] = value
            out[f"kv_tier_{tier.name}_used_bytes"] = tier.used_bytes
            out[f"kv_tier_{tier.name}_capacity_bytes"] = tier.capacity_bytes
        return out

    def load_bytes_per_s(self) -> float | None:
        """Measured pool-load rate from the cpu tier, None before the first load."""
        rate = self.cpu.stats.snapshot()["read_bytes_per_s"]
        return rate or None
