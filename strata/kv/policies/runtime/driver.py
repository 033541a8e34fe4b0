"""KVPolicyDriver: gives each request its KV policy and compacts after the steps that need it.

Where each part of a request's policy happens:

    prepare  -> (engine) attach: resolve kv_policy / kv_budget against the defaults,
                check kv_compress_prefix, give the sequence a SequenceKV ("full": none)
    schedule -> (scheduler, asking seq.kv) chunks stop at the compression point; prefix
                hits stop before the first query a policy observes; spare blocks for
                copy-on-write
    run      -> (runner, asking KVStepBuilder) slots from the KV length, positions from
                the token index, per-layer layouts, and a StepObserver when a policy
                wants queries
    update   -> (engine) after_step: at the compression point the sequence stops being
                indexed and is compressed to its budget; evicting policies then hold the
                cap while decoding
"""

from __future__ import annotations

from dataclasses import dataclass

from strata.config import DEFAULT_BUDGETS
from strata.errors import InvalidRequestError, SequenceFault, blame
from strata.kv.cache import KVCache
from strata.kv.manager import KVManager
from strata.kv.policies.base import AttentionShape
from strata.kv.policies.model_access import ModelAccess
from strata.kv.policies.registry import FULL, create_policy
from strata.kv.policies.runtime.compaction import compact
from strata.kv.policies.runtime.interfaces import PolicySequence, PolicyStep
from strata.kv.policies.runtime.rank_compaction import CompactOp, RankShard
from strata.kv.policies.runtime.reconstruction import ContextReconstruction
from strata.kv.policies.runtime.sequence_kv import SequenceKV
from strata.kv.recall.manager import RecallKV, RecallManager
from strata.kv.recall.registry import is_recall_policy


@dataclass(frozen=True)
class PolicyDefaults:
    """What a request naming no policy or budget gets (CacheConfig.kv_policy, kv_budget),
    and the decode steps between evictions (CacheConfig.evict_interval)."""

    policy: str
    budget: float | None
    evict_interval: int = 1


class KVPolicyDriver:
    def __init__(
        self,
        manager: KVManager,
        cache: KVCache,
        shape: AttentionShape,
        defaults: PolicyDefaults,
        model: ModelAccess | None = None,
        reconstruction: ContextReconstruction | None = None,
        recall: RecallManager | None = None,
        shard: RankShard | None = None,
    ) -> None:
        """model: handed to each policy (`KVPolicy.bind`); reconstruction: runs the extra
        prefill passes a policy asks for at its compression point (KVzip); recall: the
        recall store, which runs the recall policies (strata/kv/recall); shard: under
        tensor parallelism, this rank's KV heads (of `shape`, the whole model's) and the
        other ranks, which apply each compaction to theirs (rank_compaction.py)."""
        self.recall = recall
        self.shard = shard
        self.manager, self.cache, self.shape = manager, cache, shape
        self.defaults = defaults
        self.model = model
        self.reconstruction = reconstruction
        self.num_compactions = 0
        self.num_tokens_evicted = 0  # per layer, averaged over layers

    def attach(self, seq: PolicySequence) -> None:
        """Give a prepared sequence its policy state; InvalidRequestError if it cannot have it."""
        params = seq.params
        name = params.kv_policy if params.kv_policy is not None else self.defaults.policy
        budget = params.kv_budget if params.kv_budget is not None else self.defaults.budget
        budget = budget if budget is not None else DEFAULT_BUDGETS.get(name)
        prefix = params.kv_compress_prefix
        if prefix is not None and prefix > seq.num_prompt_tokens:
            raise InvalidRequestError(
                f"kv_compress_prefix ({prefix}) is longer than the prompt "
                f"({seq.num_prompt_tokens} tokens)"
            )
        if name == FULL:
            self._check_fits_pool(seq)
            return
        if budget is None:
            raise InvalidRequestError(
                f"kv_policy {name!r} needs a kv_budget: a fraction of the context in (0, 1) "
                "or a number of tokens >= 1"
            )
        if not self.cache.codec.lossless:
            raise InvalidRequestError(
                f"kv_policy {name!r} needs kv_cache_dtype 'auto': eviction is not implemented "
                f"over the {self.cache.codec.name} codec"
            )
        if is_recall_policy(name):
            seq.recall = self._attach_recall(seq, name, budget)
            return
        self._check_fits_pool(seq)
        context = prefix if prefix is not None else seq.num_prompt_tokens
        policy = create_policy(name, self.shape)
        if self.model is not None:
            policy.bind(self.model)
        device = self.cache.k.device
        seq.kv = SequenceKV(
            seq, policy, budget, context, seq.num_prompt_tokens, device,
            self.defaults.evict_interval,
        )  # fmt: skip

    def _attach_recall(self, seq: PolicySequence, name: str, budget: float) -> RecallKV:
        if self.recall is None:
            raise InvalidRequestError(
                f"kv_policy {name!r} needs the recall store: start the engine with "
                "--kv-recall-host-memory GIB or a recall --kv-policy"
            )
        # kv_compress_prefix changes nothing here: a recall policy compresses no context,
        # it picks per decode step with that step's query (both protocols are one).
        return self.recall.plan_for(
            name, budget, seq.num_prompt_tokens, seq.max_tokens, seq.token_ids, seq.cache_salt
        )

    def _check_fits_pool(self, seq: PolicySequence) -> None:
        """A sequence outside the recall store must fit the pool at its longest."""
        total = seq.num_prompt_tokens + seq.max_tokens
        held = self.manager.num_blocks * self.manager.block_size
        if total > held:
            raise InvalidRequestError(
                f"prompt + max_tokens = {total} tokens do not fit the KV pool ({held} tokens); "
                "lower max_tokens, or use a recall kv_policy (quest, shadowkv, clusterkv, pqcache, "
                "magicpig, full_offload)"
            )

    def after_step(self, step: PolicyStep) -> list[SequenceFault]:
        """Compress the sequences of this step whose compression point or cap it reached.

        A policy that raises fails its own request: its fault is returned, and the other
        sequences are compressed as usual."""
        faults = []
        for chunk in step.chunks:
            seq = chunk.seq
            if seq.kv is None or not self.manager.has(seq.request_id):
                continue
            try:
                with blame(seq.request_id):
                    self._after_step(seq, seq.kv)
            except SequenceFault as fault:
                faults.append(fault)
        return faults

    def _after_step(self, seq: PolicySequence, kv: SequenceKV) -> None:
        """Compress one sequence if this step reached its compression point or cap."""
        budgets = kv.budgets_after(seq.num_computed)
        at_compression_point = not kv.compressed and seq.num_computed >= kv.context_len
        if at_compression_point:
            kv.compressed = True
            self.manager.stop_indexing(seq.request_id)
        if budgets is None:
            return
        if at_compression_point and self.reconstruction is not None:
            passes = kv.policy.reconstruction_passes(seq.token_ids[: kv.context_len])
            if passes:
                self.reconstruction.run(seq, passes)
        masks = kv.policy.select(kv, budgets)
        heads = slice(None) if self.shard is None else self.shard.heads
        compaction, change = compact(
            self.manager, self.cache, seq.request_id, masks, budgets, heads
        )
        if self.shard is not None and self.shard.peers is not None:
            self.shard.peers.send(CompactOp.of(change, masks, budgets))
        kv.compacted(compaction)
        self.num_compactions += 1
        freed = sum(compaction.old_num_slots) - sum(budgets)
        self.num_tokens_evicted += freed // self.shape.num_layers

    def stats(self) -> dict[str, int]:
        return {
            "kv_compactions": self.num_compactions,
            "kv_tokens_evicted": self.num_tokens_evicted,
            "kv_reconstruction_tokens": (
                self.reconstruction.num_tokens if self.reconstruction is not None else 0
            ),
        }
