"""SimReplica: one engine replica — a waiting queue, a running batch and a BlockCache.

Each step takes the running sequences in admission order, then admits waiting ones in
arrival order (first come, first served) while the token budget and `max_num_seqs` last,
as the engine's Scheduler does. A sequence's chunk:

    prompt tokens 0 ............ computed ........ prompt_len ... + generated tokens
                  └ reused blocks ┘└ this step's chunk (prefill, at most the budget) ┘
    decoding: one token a step (the last sampled one), sampling the next

A sequence allocates every block it will need (prompt + output) when admitted, so no
step runs out of blocks and nothing is preempted: admission waits until the blocks are
there. A full prompt or output block is registered under its key once computed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from strata.sim.block_cache import BlockCache, Key, Listener
from strata.sim.costs import StepCost, StepWork, chunk_pairs
from strata.sim.request import SimRequest

ROLES = ("both", "prefill", "decode")


@dataclass
class SimSeq:
    request: SimRequest
    sent_s: float  # when the client sent it
    computed: int = 0  # tokens whose KV is written
    generated: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the cache when admitted
    first_token_s: float | None = None
    finished_s: float | None = None
    replica: int | None = None  # the replica that computed its prefill, once admitted
    keyed: list[Key] = field(default_factory=list)  # blocks it references, prompt order
    anonymous: int = 0

    @property
    def prompt_len(self) -> int:
        return self.request.prompt_len

    @property
    def total_len(self) -> int:
        return self.request.prompt_len + self.request.output_len

    @property
    def ttft_s(self) -> float:
        """Time to first token, from when the client sent it (once it has one)."""
        if self.first_token_s is None:
            raise RuntimeError(f"request {self.request.id} has no token yet")
        return self.first_token_s - self.sent_s

    @property
    def e2e_s(self) -> float:
        if self.finished_s is None:
            raise RuntimeError(f"request {self.request.id} has not finished")
        return self.finished_s - self.sent_s

    @property
    def tpot_s(self) -> float | None:
        """Mean seconds per output token after the first; None for a one-token answer."""
        if self.request.output_len < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.request.output_len - 1)


@dataclass
class StepResult:
    first_tokens: list[SimSeq] = field(default_factory=list)
    finished: list[SimSeq] = field(default_factory=list)
    handed_off: list[SimSeq] = field(default_factory=list)  # prefill done (role prefill)


class SimReplica:
    def __init__(
        self, index: int, cost: StepCost, blocks: int, block_size: int,
        max_batched_tokens: int, max_seqs: int, role: str = "both",
        listener: Listener | None = None,
    ) -> None:  # fmt: skip
        if role not in ROLES:
            raise ValueError(f"unknown replica role {role!r}; valid: {', '.join(ROLES)}")
        self.index = index
        self.cost = cost
        self.cache = BlockCache(blocks, listener)
        self.block_size = block_size
        self.max_batched_tokens = max_batched_tokens
        self.max_seqs = max_seqs
        self.role = role
        self.waiting: deque[SimSeq] = deque()
        self.running: list[SimSeq] = []
        self._step: list[tuple[SimSeq, int]] | None = None  # chunks of the step in progress
        self.busy_s = 0.0

    @property
    def kv_use(self) -> float:
        return self.cache.used / self.cache.capacity

    @property
    def stepping(self) -> bool:
        return self._step is not None

    def enqueue(self, seq: SimSeq) -> None:
        self.waiting.append(seq)

    def start_step(self) -> float | None:
        """Plan the next step; its duration in seconds, or None when there is nothing to run."""
        budget = self.max_batched_tokens
        chunks: list[tuple[SimSeq, int]] = []
        for seq in self.running:
            if budget <= 0:
                break
            n = min(max(1, seq.prompt_len - seq.computed), budget)
            chunks.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            if not self._admit(seq):
                break
            self.waiting.popleft()
            self.running.append(seq)
            n = min(max(1, seq.prompt_len - seq.computed), budget)
            chunks.append((seq, n))
            budget -= n
        if not chunks:
            return None
        self._step = chunks
        seconds = self.cost.seconds(step_work(chunks))
        self.busy_s += seconds
        return seconds

    def _admit(self, seq: SimSeq) -> bool:
        """Reuse the cached head of its prompt and allocate the rest; False if no room."""
        bs = self.block_size
        need = -(-seq.total_len // bs)
        if need > self.cache.capacity:
            raise ValueError(
                f"request {seq.request.id} needs {need} blocks; a replica has {self.cache.capacity}"
            )
        held = 0
        if seq.computed == 0:  # a new request (a handed-off one arrives with its prompt)
            keys = seq.request.prompt_keys(bs)
            held = self.cache.match(keys)
            if not self.cache.can_allocate(need - held, keys[:held]):
                return False
            self.cache.acquire(keys[:held])
            seq.keyed = list(keys[:held])
            seq.computed = seq.cached_tokens = held * bs
        elif not self.cache.can_allocate(need):
            return False
        self.cache.allocate(need - held)
        seq.anonymous = need - held
        if seq.replica is None:
            seq.replica = self.index
        return True

    def end_step(self, now: float) -> StepResult:
        """Apply the step planned by start_step, which ends at `now`."""
        if self._step is None:
            raise RuntimeError("end_step without a step in progress")
        chunks, self._step = self._step, None
        result = StepResult()
        for seq, n in chunks:
            seq.computed += n
            if self.role != "decode":
                self._register(seq)
            if seq.computed < seq.prompt_len:
                continue
            seq.generated += 1
            if seq.first_token_s is None:
                seq.first_token_s = now
                result.first_tokens.append(seq)
            if seq.generated >= seq.request.output_len:
                seq.finished_s = now
                result.finished.append(seq)
            elif self.role == "prefill":
                result.handed_off.append(seq)
        for seq in result.finished + result.handed_off:
            self.running.remove(seq)
            self.cache.release(seq.keyed, seq.anonymous)
            seq.keyed, seq.anonymous = [], 0
        return result

    def _register(self, seq: SimSeq) -> None:
        keys = seq.request.keys
        full = min(seq.computed // self.block_size, len(keys))
        for i in range(len(seq.keyed), full):
            if seq.anonymous == 0 or not self.cache.register(keys[i]):
                break  # a duplicate: this block and the ones after it stay anonymous
            seq.anonymous -= 1
            seq.keyed.append(keys[i])


def step_work(chunks: list[tuple[SimSeq, int]]) -> StepWork:
    """What a step of these (sequence, tokens) chunks computes, as the cost model counts."""
    rows = prefill_pairs = decode_pairs = 0
    for seq, n in chunks:
        pairs = chunk_pairs(seq.computed, seq.computed + n)
        if seq.computed >= seq.prompt_len:
            decode_pairs += pairs
        else:
            prefill_pairs += pairs
        rows += seq.computed + n >= seq.prompt_len
    return StepWork(sum(n for _, n in chunks), rows, prefill_pairs, decode_pairs)
