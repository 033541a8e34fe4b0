"""A worker rank (1..N-1): its process's whole life.

    start ─► connect (Communicator) ─► load its share ─► "loaded" ─► pool size (blocks)
          ─► build its KV pool, tiers and recall store ─► "ready"
          ─► steps, tier operations, compactions and recall releases (channel.py) until
             stop or rank 0 is gone

The worker ignores SIGINT and SIGTERM: rank 0 drains and stops it. It exits by itself
when rank 0 dies: at once if idle (its pipe reaches EOF), within the group's timeout if
inside a step (the collective fails).
"""

from __future__ import annotations

import contextlib
import signal
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from strata.attention.backend import AttentionBackend, StepMetadata, get_backend
from strata.config import CacheConfig, TierConfig
from strata.engine.tp.channel import WorkerOp, receive, receive_step
from strata.engine.tp.step_wire import StepInputs
from strata.engine.tp.worker_recall import RecallSize, WorkerRecall
from strata.kv.cache import KVCache
from strata.kv.codec import get_codec
from strata.kv.coded_attention import attention_over
from strata.kv.policies.runtime.gathered import GatheredObserver, ObservedRows
from strata.kv.policies.runtime.rank_compaction import CompactOp, apply_compact_op
from strata.kv.policies.runtime.step_kv import layer_metadata
from strata.kv.pool_order import attention_slope
from strata.kv.recall.mirror import RecallRelease
from strata.kv.recall.ranks import HeadShard
from strata.kv.tiers.build import build_tiers
from strata.kv.tiers.manager import TierManager
from strata.kv.tiers.tier_ops import reply_key, run_tier_op
from strata.models.loader import load_model
from strata.models.tp.comm import Communicator


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its rank of the engine (picklable)."""

    model: str | None
    rank: int
    size: int
    port: int
    timeout_s: float
    device: str
    dtype: torch.dtype
    max_positions: int | None
    seed: int
    block_size: int
    attention_backend: str
    rank0_pid: int
    threads: int  # torch threads (CPU ranks share the host's cores)
    tiers: TierConfig  # its own tiers, holding its own KV heads (kv/tiers/tier_ops.py)
    kv_heads: slice  # its KV heads among the model's (KV policies' masks)
    kv_cache_dtype: str  # the KV codec; a lossy one keeps tail_rows open blocks exact
    tail_rows: int
    recall: CacheConfig | None  # the engine's, when it has a recall store (recall/build.py)


def run_worker(spec: WorkerSpec, conn: Connection) -> None:
    """The worker process's target: report "loaded"/"ready" or ("error", text) on `conn`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(spec.threads)
    try:
        device = torch.device(spec.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        comm = Communicator.connect(spec.rank, spec.size, spec.port, spec.timeout_s, device)
        loaded = load_model(spec.model, device, spec.dtype, spec.max_positions, spec.seed,
                            comm=comm)  # fmt: skip
        conn.send(("loaded", None))
        message = receive(conn, spec.rank0_pid)
        if message is None:
            return
        num_blocks, *recall_size = np.frombuffer(message, dtype=np.int64).tolist()
        kv = KVCache(loaded.config, num_blocks, spec.block_size, spec.dtype, device,
                     get_codec(spec.kv_cache_dtype), spec.tail_rows)  # fmt: skip
        tiers = build_tiers(spec.tiers, kv, loaded.fingerprint, spec.dtype,
                            f"tp{spec.size}r{spec.rank}",
                            slope=attention_slope(loaded.config, spec.block_size))  # fmt: skip
        backend = attention_over(kv, get_backend(spec.attention_backend))
        recall = None
        if spec.recall is not None:
            size = RecallSize(*recall_size)
            shard = HeadShard(comm, size.model_kv_heads)
            recall = WorkerRecall.build(spec.recall, loaded.config, spec.dtype, device,
                                        loaded.model.rope, backend, size, shard)  # fmt: skip
        conn.send(("ready", None))
        try:
            serve_steps(spec, conn, comm, loaded.model, kv, backend, tiers, recall)
        finally:
            if tiers is not None:
                tiers.close(flush=True)
    except Exception:
        with contextlib.suppress(OSError):  # rank 0 is gone
            conn.send(("error", f"rank {spec.rank}: {traceback.format_exc()}"))


def serve_steps(
    spec: WorkerSpec, conn: Connection, comm: Communicator, model: torch.nn.Module, kv: KVCache,
    backend: AttentionBackend[Any], tiers: TierManager | None, recall: WorkerRecall | None,
) -> None:  # fmt: skip
    """Run every step and operation rank 0 sends, until it says stop or is gone."""
    device = comm.device
    after: torch.cuda.Event | None = None  # the last step's end, on CUDA
    while True:
        step = receive_step(conn, comm, spec.rank0_pid)
        if step is None:
            return
        if not isinstance(step, StepInputs):
            run_op(spec, conn, kv, tiers, recall, step, after)
            continue
        if tiers is not None:  # a store still reading a block this step writes ends first
            written = [step.slots, *(part.slot_mapping for part in step.layer_layouts)]
            for block_id in np.unique(np.concatenate(written) // kv.block_size).tolist():
                tiers.before_overwrite(block_id)
        ids, positions, slots, rows = (
            torch.from_numpy(a).to(device)
            for a in (step.ids, step.positions, step.slots, step.logits_rows)
        )
        if kv.tails is not None:
            kv.tails.live_blocks = set(step.live_blocks.tolist()).copy  # rank 0's, this step
        meta = step_metadata(backend, step, slots, device)
        attention: AttentionBackend[Any] = backend
        if len(step.recall):  # recall sequences' rows: their own stores (worker_recall.py)
            assert recall is not None, "rank 0 sends recall rows only with a recall store"
            meta, attention = recall.metadata(step, slots, meta), recall.attention
        observer = None
        if len(step.observed):  # a KV policy's queries: this rank's share of the scores
            observed = ObservedRows.decode(step.observed)
            observer = GatheredObserver(kv, observed, step.layout.block_tables, comm, [])
        model(ids, positions, kv, attention, meta, rows, observer)
        if device.type == "cuda" and tiers is not None:
            after = torch.cuda.Event()
            after.record()


def step_metadata(
    backend: AttentionBackend[Any], step: StepInputs, slots: torch.Tensor, device: torch.device
) -> StepMetadata | None:
    """The backend's metadata over the step's pool rows (None when all are recall rows)."""
    if not step.layout.query_lens:
        return None
    if len(step.layer_of):  # a KV policy's layers attend over different KV
        return layer_metadata(backend, step.layer_layouts, step.layer_of.tolist(), device)
    return backend.prepare(step.layout, slots, device)


def run_op(
    spec: WorkerSpec, conn: Connection, kv: KVCache, tiers: TierManager | None,
    recall: WorkerRecall | None, op: WorkerOp, after: torch.cuda.Event | None,
) -> None:  # fmt: skip
    """A compaction of this rank's heads, a recall release, or a tier operation (answered
    if it asks)."""
    if isinstance(op, RecallRelease):
        assert recall is not None, "rank 0 releases recall sequences only with a recall store"
        recall.mirror.release(op)
        return
    if isinstance(op, CompactOp):
        if tiers is not None:  # blocks the compaction writes: their stores end first
            for block_id in [*op.change.new, *(dst for _, dst in op.change.copies)]:
                tiers.before_overwrite(block_id)
        apply_compact_op(kv, op, spec.kv_heads)
        return
    assert tiers is not None, "rank 0 sends tier operations only when tiers are on"
    answer = run_tier_op(tiers, op, spec.rank, after)
    if answer is not None:
        conn.send(("tier", reply_key(op), answer))
