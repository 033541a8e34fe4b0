"""Frozen configuration dataclasses. Each validates itself on construction."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from strata.options import OptionField, check_choices, flatten, option

SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}

# q/k norms: "full" normalises the whole q (and k) projection (OLMoE); "head" each head (Qwen3).
QK_NORMS: dict[str, str] = {"olmoe": "full", "qwen3_moe": "head"}


def check_power_of_two(name: str, value: int) -> None:
    if value <= 0 or value & (value - 1):
        raise ValueError(f"{name} must be a positive power of two, got {value}")


def check_at_least_one(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def check_budget(budget: float) -> None:
    """Raise ValueError unless `budget` is a fraction in (0, 1) or a whole number >= 1."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"kv_budget must be a number, got {budget!r}")
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(
            f"kv_budget must be a fraction of the context in (0, 1) or a whole number of "
            f"tokens >= 1; got {budget}"
        )
    if budget >= 1 and budget != int(budget):
        raise ValueError(
            f"kv_budget >= 1 is a number of tokens and must be whole; got {budget} "
            "(use a value below 1 for a fraction of the context)"
        )

@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder, dense or Mixture-of-Experts, read from a
    transformers config.

    MoE fields (num_experts 0 means a dense model): every layer in `moe_layers` replaces
    its MLP by `num_experts` routed experts of `moe_intermediate_size`, of which each token
    uses `num_experts_per_tok`, plus (Qwen2-MoE) one shared expert behind a sigmoid gate.
    Other layers keep a dense MLP of `intermediate_size`.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    hidden_act: str
    sliding_window: int | None  # attention span limit; Strata caps the context at it
    hf_config: Any = field(repr=False, compare=False)
    qk_norm: str | None = None  # None, "full" (OLMoE) or "head" (Qwen3-MoE)
    o_bias: bool = False  # o_proj has a bias (OLMoE, Qwen3-MoE with attention_bias)
    clip_qkv: float | None = None  # OLMoE: q, k, v clamped to [-clip_qkv, clip_qkv]
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    norm_topk_prob: bool = False  # renormalise the top-k probabilities to sum to 1
    moe_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_ARCHITECTURES:
            from strata.errors import UnsupportedModelError

            supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_ARCHITECTURES.items())
            raise UnsupportedModelError(
                f"model_type {self.model_type!r} is not supported; supported: {supported}"
            )
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.hidden_act not in ("silu", "swish"):
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only silu)")
        if self.qk_norm not in (None, "full", "head"):
            raise ValueError(f"qk_norm must be None, 'full' or 'head'; got {self.qk_norm!r}")
        if self.num_experts < 0:
            raise ValueError(f"num_experts must be >= 0, got {self.num_experts}")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                f"[1, num_experts ({self.num_experts})]"
            )
        if self.num_experts and self.moe_intermediate_size <= 0:
            raise ValueError(f"moe_intermediate_size must be > 0, got {self.moe_intermediate_size}")
        bad_layers = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
        if bad_layers or (self.moe_layers and not self.num_experts):
            raise ValueError(
                f"moe_layers {list(self.moe_layers)} must name layers in [0, {self.num_layers}) "
                f"of a model with experts (num_experts={self.num_experts})"
            )

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        model_type = getattr(hf_config, "model_type", None) or "unknown"
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        return cls(
            model_type=model_type,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            max_position_embeddings=hf_config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama and Mistral only when attention_bias is set.
            qkv_bias=_qkv_bias(model_type, hf_config),
            hidden_act=getattr(hf_config, "hidden_act", "silu"),
            sliding_window=_sliding_window(model_type, hf_config),
            hf_config=hf_config,
            qk_norm=QK_NORMS.get(model_type),
            o_bias=model_type in QK_NORMS and bool(getattr(hf_config, "attention_bias", False)),
            clip_qkv=getattr(hf_config, "clip_qkv", None),
            **_moe_fields(model_type, hf_config),
        )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def context_limit(self) -> int:
        """Longest sequence served exactly: inside the sliding window, full attention
        and sliding-window attention are the same function."""
        if self.sliding_window is None:
            return self.max_position_embeddings
        return min(self.max_position_embeddings, self.sliding_window)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token over all layers, per byte of element size."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


def _qkv_bias(model_type: str, hf_config: Any) -> bool:
    if model_type == "qwen2":  # always has q/k/v biases
        return True
    if model_type == "qwen2_moe":
        return bool(getattr(hf_config, "qkv_bias", True))
    return bool(getattr(hf_config, "attention_bias", False))


def _moe_fields(model_type: str, hf_config: Any) -> dict[str, Any]:
    """The MoE fields of ModelConfig for a transformers config (empty for dense models)."""
    num_experts = getattr(hf_config, "num_local_experts", None) or getattr(
        hf_config, "num_experts", None
    )
    if model_type not in ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe") or not num_experts:
        return {}
    layers = list(range(hf_config.num_hidden_layers))
    if model_type in ("qwen2_moe", "qwen3_moe"):  # some layers may keep a dense MLP
        dense = set(getattr(hf_config, "mlp_only_layers", None) or ())
        step = getattr(hf_config, "decoder_sparse_step", 1) or 1
        layers = [i for i in layers if i not in dense and (i + 1) % step == 0]
    return {
        "num_experts": int(num_experts),
        "num_experts_per_tok": int(hf_config.num_experts_per_tok),
        "moe_intermediate_size": int(
            getattr(hf_config, "moe_intermediate_size", None) or hf_config.intermediate_size
        ),
        "shared_expert_intermediate_size": int(
            getattr(hf_config, "shared_expert_intermediate_size", 0) or 0
        ),
        # Mixtral always renormalises the top-k probabilities.
        "norm_topk_prob": model_type == "mixtral" or bool(hf_config.norm_topk_prob),
        "moe_layers": tuple(layers),
    }


def _sliding_window(model_type: str, hf_config: Any) -> int | None:
    window = getattr(hf_config, "sliding_window", None)
    if model_type == "qwen2" and not getattr(hf_config, "use_sliding_window", False):
        return None
    return int(window) if window else None


# Choices of the options below. Those marked "registry" must name the same entries as
# that registry (tests/test_options.py checks it); "auto" and "full" are not entries.
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
AttentionBackendName = Literal["auto", "reference", "triton"]  # registry: attention BACKENDS
OverlapMode = Literal["auto", "on", "off"]
KVCacheDtype = Literal["auto", "fp8", "int8", "int4", "int2"]  # registry: kv.codec CODECS
KVPolicyName = Literal[  # registry: kv.policies POLICIES, then kv.recall RECALL_POLICIES
    "full", "streaming", "h2o", "snapkv", "pyramidkv", "chunkkv", "tova", "treekv",
    "expected_attention", "kvzip", "quest", "shadowkv", "clusterkv", "pqcache", "magicpig",
    "full_offload",
]  # fmt: skip
# A policy's budget when neither the request nor the engine gives one: its paper's default
# (PQCache: 10% of the tokens attended besides the sink and the recent window)
DEFAULT_BUDGETS: dict[str, float] = {"pqcache": 0.1}
TierEviction = Literal["lru", "fifo", "cost"]  # registry: kv.tiers EVICTION_ORDERS
KVEviction = Literal["lru", "cost"]  # registry: kv.pool_order FREE_BLOCK_ORDERS
TierCodecName = Literal["none", "fp8", "int8", "int4"]  # kv.codec CODECS names, and none
PreemptionMode = Literal["recompute", "swap", "auto"]
ExpertCachePolicy = Literal["lfru", "lru"]  # registry: moe.policies POLICIES
ExpertCPUCompute = Literal["auto", "on", "off"]
ExpertMissPrecision = Literal["full", "int8", "int4"]


@dataclass(frozen=True)
class TierConfig:
    """The KV tiers below the GPU pool; all off by default. The disk and remote tiers
    stage through the CPU tier, which is STAGING_GIB when only they are set."""

    cpu_memory: float | None = field(default=None, metadata=option(
        "a CPU RAM tier of this many GiB (pinned on CUDA hosts); disk and remote tiers "
        "stage through it and add a 1 GiB one if it is not given",
        keyword="kv_cpu_memory", metavar="GIB",
    ))  # fmt: skip
    disk_dir: str | None = field(default=None, metadata=option(
        "a local disk tier in this directory; blocks survive restarts and are found "
        "again by any engine of the same model, dtype and block size",
        keyword="kv_disk_dir", metavar="PATH",
    ))  # fmt: skip
    disk_size: float = field(default=16.0, metadata=option(
        "cap of the disk tier in GiB (default 16); --kv-tier-eviction says which blocks go first",
        keyword="kv_disk_size", metavar="GIB",
    ))  # fmt: skip
    disk_direct_io: bool = field(default=False, metadata=option(
        "read the disk tier with O_DIRECT, around the OS page cache, where the filesystem "
        "allows it (not tmpfs) and the CPU tier's memory is page-aligned (pinned CUDA "
        "memory is); otherwise reads are buffered",
        keyword="kv_disk_direct_io",
    ))  # fmt: skip
    remote: str | None = field(default=None, metadata=option(
        "a remote tier on a Valkey or Redis server (valkey://host:port or "
        "redis://host:port), shared by every engine that points at it; its size is the "
        "server's maxmemory",
        keyword="kv_remote", metavar="URL",
    ))  # fmt: skip
    remote_timeout_s: float = field(default=0.5, metadata=option(
        "seconds before a remote call counts as failed (the block is recomputed and the "
        "tier retried later; default 0.5)",
        keyword="kv_remote_timeout_s", flag="--kv-remote-timeout", metavar="S",
    ))  # fmt: skip
    store_secret: str | None = field(default=None, repr=False, metadata=option(
        "the secret that authenticates disk and remote tier blocks (at least 16 bytes; "
        "see kv_store_secret_file)",
        keyword="kv_store_secret", cli=False,
    ))  # fmt: skip
    store_secret_file: str | None = field(default=None, metadata=option(
        "a file holding the secret of the disk and remote tiers (default: "
        "$STRATA_KV_STORE_SECRET): every block carries a keyed MAC, and blocks that fail "
        "it are misses and deleted; engines with other secrets, or none, never share blocks",
        keyword="kv_store_secret_file", metavar="PATH",
    ))  # fmt: skip
    store_encrypt: bool = field(default=False, metadata=option(
        "also encrypt disk and remote tier blocks (token ids and KV) with AES-256-GCM under "
        "the store secret",
        keyword="kv_store_encrypt",
    ))  # fmt: skip
    io_threads: int = field(default=8, metadata=option(
        "disk files read, and remote MGETs in flight, at once when a prefix is loaded from "
        "the disk or remote tier (default 8)",
        keyword="kv_tier_io_threads", metavar="N",
    ))  # fmt: skip
    codec: TierCodecName = field(default="none", metadata=option(
        "code blocks on their way into the tiers (lossy, fewer bytes on PCIe, disk and "
        "network): fp8 (e4m3, per-token scales) or int8/int4 (KIVI groups); decoded back "
        "into the pool on load. Blocks of one codec are never read under another (default "
        "none: the pool's exact bytes; needs --kv-cache-dtype auto)",
        keyword="kv_tier_codec",
    ))  # fmt: skip
    eviction: TierEviction = field(default="lru", metadata=option(
        "eviction order inside the cpu and disk tiers: lru (default), fifo, or cost (the "
        "GPU pool's --kv-eviction cost value: hit likelihood x recompute cost of the block's "
        "position in its prefix; blocks a restarted disk tier finds count as position 0); "
        "the remote tier's eviction is the server's",
        keyword="kv_tier_eviction",
    ))  # fmt: skip
    preemption_mode: PreemptionMode = field(default="auto", metadata=option(
        "when the GPU pool runs out: recompute the preempted sequence later, swap (keep "
        "its blocks pinned in the CPU tier), or auto: swap when reloading is estimated to be "
        "cheaper (needs a tier; default auto)",
    ))  # fmt: skip
    session_gpu_fraction: float = field(default=0.25, metadata=option(
        "share of the GPU pool that session pins (session_id + cache_ttl_s) may hold; "
        "beyond it pins go to the CPU tier (default 0.25)",
        metavar="F",
    ))  # fmt: skip

    STAGING_GIB = 1.0

    def __post_init__(self) -> None:
        check_choices(self)
        if self.cpu_memory is not None and not self.cpu_memory > 0:
            raise ValueError(f"kv_cpu_memory must be > 0 GiB, got {self.cpu_memory}")
        if not self.disk_size > 0:
            raise ValueError(f"kv_disk_size must be > 0 GiB, got {self.disk_size}")
        if self.remote is not None and not self.remote.startswith(("valkey://", "redis://")):
            raise ValueError(
                f"kv_remote must be a valkey://host:port or redis://host:port URL; "
                f"got {self.remote!r}"
            )
        if not self.remote_timeout_s > 0:
            raise ValueError(f"kv_remote_timeout_s must be > 0, got {self.remote_timeout_s}")
        check_at_least_one("kv_tier_io_threads", self.io_threads)
        if self.codec != "none" and not self.enabled:
            raise ValueError(
                f"kv_tier_codec {self.codec!r} codes blocks for the KV tiers, but none is on: "
                "set kv_cpu_memory, kv_disk_dir or kv_remote"
            )
        if not 0.0 <= self.session_gpu_fraction <= 1.0:
            raise ValueError(
                f"session_gpu_fraction must be in [0, 1], got {self.session_gpu_fraction}"
            )

    @property
    def enabled(self) -> bool:
        return any(x is not None for x in (self.cpu_memory, self.disk_dir, self.remote))

    @property
    def cpu_gib(self) -> float:
        return self.cpu_memory if self.cpu_memory is not None else self.STAGING_GIB


@dataclass(frozen=True)
class RecallConfig:
    """The recall store (strata/kv/recall): on when the default kv_policy is a recall
    policy or host_memory is given; recall requests need it."""

    host_memory: float | None = field(default=None, metadata=option(
        "GiB of pinned host memory for the recall store, which holds every block of the "
        "sequences under a recall policy (quest, shadowkv, clusterkv, pqcache, magicpig, "
        "full_offload; magicpig's hash tables may take as much again beside it); default: a "
        "quarter of the machine's RAM when --kv-policy is a recall policy, else no recall "
        "store",
        keyword="kv_recall_host_memory", metavar="GIB",
    ))  # fmt: skip
    gpu_memory: float | None = field(default=None, metadata=option(
        "GiB of GPU memory for recall sequences' resident KV (sink, window, dense layers), "
        "summaries and working sets, taken out of the KV budget (default: half of it when "
        "--kv-policy is a recall policy, else a quarter)",
        keyword="kv_recall_gpu_memory", metavar="GIB",
    ))  # fmt: skip
    dense_layers: int = field(default=2, metadata=option(
        "first layers a recall policy leaves dense: every token on the GPU, full attention "
        "(default 2, as Quest)",
        keyword="kv_recall_dense_layers", metavar="N",
    ))  # fmt: skip
    landmark_tokens: int = field(default=8, metadata=option(
        "tokens per shadowkv landmark (their mean key scores them; a block is scored by its "
        "best landmark): a power of two, at most one block (default 8, as ShadowKV; 4 "
        "picks better at small budgets for twice the landmarks' GPU memory)",
        keyword="kv_recall_landmark_tokens", metavar="N",
    ))  # fmt: skip
    quest_page_tokens: int | None = field(default=None, metadata=option(
        "tokens per quest min/max page: a power of two below the block size keeps min and "
        "max per page and scores a block by its best page (a tighter bound, for block_size "
        "/ N times the summaries' GPU memory); default one page per block, as Quest",
        keyword="kv_recall_quest_page_tokens", metavar="N",
    ))  # fmt: skip
    working_set_factor: int = field(default=1, metadata=option(
        "working-set slots per block a recall decode step picks, per layer and KV head "
        "(default 1): above 1, blocks picked in earlier steps stay on the GPU, least "
        "recently picked evicted first, so a block picked again soon is not fetched again; "
        "each step still attends only its picks",
        keyword="kv_recall_working_set_factor", metavar="N",
    ))  # fmt: skip
    prefetch: bool = field(default=False, metadata=option(
        "start each sparse layer's recall a layer early: the layer's query projection, applied "
        "to the layer before's input, predicts its picks, which are fetched on a side stream "
        "while the layer before runs; the layer still attends exactly its own picks, "
        "fetching what the prediction missed, so outputs do not change (stats: "
        "recall_prefetch_precision, per layer)",
        keyword="kv_recall_prefetch",
    ))  # fmt: skip
    page_rows: int = field(default=4, metadata=option(
        "most recall sequences of one policy, budget and length that share a page of GPU "
        "tensors and decode with one set of kernels per layer (default 4); a new page gets "
        "a row for each sequence of its kind live or waiting, up to this, and reserves "
        "them while any is in use",
        keyword="kv_recall_page_rows", metavar="N",
    ))  # fmt: skip

    def __post_init__(self) -> None:
        check_at_least_one("kv_recall_page_rows", self.page_rows)
        check_at_least_one("kv_recall_working_set_factor", self.working_set_factor)
        for name, value in (("kv_recall_host_memory", self.host_memory),
                            ("kv_recall_gpu_memory", self.gpu_memory)):  # fmt: skip
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 GiB, got {value}")
        if self.dense_layers < 0:
            raise ValueError(f"kv_recall_dense_layers must be >= 0, got {self.dense_layers}")
        check_power_of_two("kv_recall_landmark_tokens", self.landmark_tokens)
        if self.quest_page_tokens is not None:
            check_power_of_two("kv_recall_quest_page_tokens", self.quest_page_tokens)


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: its block pool, prefix caching, tiers, codec and default policy.

    Without kv_cache_memory or num_blocks the pool is, on CUDA, gpu_memory_utilization of
    the device memory minus the peak measured in a warm-up; on CPU, DEFAULT_CPU_KV_GIB.
    """

    block_size: int = field(default=16, metadata=option("tokens per KV block (default 16)"))
    kv_cache_memory: float | None = field(default=None, metadata=option(
        "GiB for the KV block pool (default: 2 on CPU; on CUDA what is left of "
        "--gpu-memory-utilization after the weights and a warm-up)",
        metavar="GIB",
    ))  # fmt: skip
    num_blocks: int | None = field(default=None, metadata=option(
        "an exact number of KV blocks; overrides kv_cache_memory (tests, reproductions)",
        keyword="num_kv_blocks", cli=False,
    ))  # fmt: skip
    gpu_memory_utilization: float = field(default=0.90, metadata=option(
        "fraction of GPU memory Strata may use in all (default 0.90)",
    ))  # fmt: skip
    enable_prefix_caching: bool = field(default=True, metadata=option(
        "do not reuse KV blocks across requests",
        flag="--no-prefix-caching",
    ))  # fmt: skip
    reuse_holes: bool = field(default=True, metadata=option(
        "reuse only the cached blocks before the first missing one (default: also those "
        "after it, computing just the missing blocks; the outputs are the same)",
        keyword="kv_reuse_holes", flag="--no-kv-reuse-holes",
    ))  # fmt: skip
    eviction: KVEviction = field(default="lru", metadata=option(
        "which cached blocks the GPU pool evicts first: lru (least recently released) or "
        "cost (lowest hit likelihood x recompute cost: a block late in a long prefix costs "
        "more to recompute than an early one)",
        keyword="kv_eviction",
    ))  # fmt: skip
    tiers: TierConfig = field(default_factory=TierConfig)
    recall: RecallConfig = field(default_factory=RecallConfig)
    kv_cache_dtype: KVCacheDtype = field(default="auto", metadata=option(
        "KV block codec: auto = the model dtype; fp8 (e4m3, per-token scales) or "
        "int8/int4/int2 (KIVI: keys per channel, values per token) store complete blocks "
        "coded, so the same --kv-cache-memory holds more tokens; each sequence's open block "
        "stays in full precision",
    ))  # fmt: skip
    kv_policy: KVPolicyName = field(default="full", metadata=option(
        "KV eviction policy of requests that name none (default full: lossless); "
        "HTTP bodies and SamplingParams may choose their own",
    ))  # fmt: skip
    kv_budget: float | None = field(default=None, metadata=option(
        "KV the policy keeps: a fraction of the context if < 1, tokens if >= 1 (every policy "
        "but full needs one, except pqcache: 0.1 by default, as PQCache)",
        metavar="B",
    ))  # fmt: skip
    kv_evict_interval: int | None = field(default=None, metadata=option(
        "decode steps between evictions of the policies that evict while decoding "
        "(streaming, h2o, tova, treekv): the cache grows to cap + N - 1 tokens, then evicts "
        "back to its cap (default: the block size, so each eviction frees a block; 1 = "
        "every step, as the papers define them)",
        metavar="N",
    ))  # fmt: skip

    DEFAULT_CPU_KV_GIB = 2.0
    KV_CACHE_DTYPES: ClassVar[tuple[str, ...]] = typing.get_args(KVCacheDtype)

    def __post_init__(self) -> None:
        check_power_of_two("block_size", self.block_size)
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 GiB, got {self.kv_cache_memory}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {self.num_blocks}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        check_choices(self)
        if self.tiers.enabled and not self.enable_prefix_caching:
            raise ValueError(
                "KV tiers store blocks under their prefix-cache keys: they need prefix caching on"
            )
        if self.tiers.codec != "none" and self.kv_cache_dtype != "auto":
            raise ValueError(
                f"kv_tier_codec {self.tiers.codec!r} needs kv_cache_dtype auto: the "
                f"{self.kv_cache_dtype} pool already stores its blocks coded, and the tiers "
                "keep those bytes"
            )
        self._check_kv_budget()
        if self.kv_evict_interval is not None:
            check_at_least_one("kv_evict_interval", self.kv_evict_interval)

    @property
    def evict_interval(self) -> int:
        """kv_evict_interval resolved: the block size unless set."""
        return self.kv_evict_interval if self.kv_evict_interval is not None else self.block_size

    def _check_kv_budget(self) -> None:

        if self.kv_budget is not None:
            check_budget(self.kv_budget)
        elif self.kv_policy != "full" and self.kv_policy not in DEFAULT_BUDGETS:
            raise ValueError(
                f"kv_policy {self.kv_policy!r} needs a kv_budget: a fraction of the context "
                "in (0, 1) or a number of tokens >= 1"
            )


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_batched_tokens: int = field(default=2048, metadata=option(
        "tokens computed per step, prefill chunks and decodes together (default 2048)",
    ))  # fmt: skip
    max_num_seqs: int = field(default=256, metadata=option(
        "sequences running at once (default 256)",
    ))  # fmt: skip
    max_model_len: int | None = field(default=None, metadata=option(
        "longest sequence, prompt plus output (default: the model's context length)",
    ))  # fmt: skip
    overlap: OverlapMode = field(default="auto", metadata=option(
        "schedule and launch step k+1 while the GPU runs step k, so the host's scheduling "
        "and output work hides behind the GPU's (a step's tokens reach the host one step "
        "later): auto (on CUDA without tensor parallelism or expert offloading), on, off",
        keyword="overlap_scheduling",
    ))  # fmt: skip

    def __post_init__(self) -> None:
        check_choices(self)
        if self.max_num_batched_tokens <= 0:
            raise ValueError(
                f"max_num_batched_tokens must be > 0, got {self.max_num_batched_tokens}"
            )
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be > 0, got {self.max_num_seqs}")
        if self.max_model_len is not None and self.max_model_len <= 1:
            raise ValueError(f"max_model_len must be > 1, got {self.max_model_len}")


@dataclass(frozen=True)
class MoEConfig:
    """Expert offloading for Mixture-of-Experts models (ignored by dense models).

    Offloading is on when gpu_memory or expert_slots is set: routed experts live in
    pinned CPU memory and a GPU expert cache, carved from one arena with the KV blocks,
    holds some of them. With expert_slots alone the KV pool comes from CacheConfig.

    expert_fraction: share of the arena given to expert slots at start (capped at every
    expert, and so that one max_model_len sequence fits in KV).
    naive: benchmark baseline: copy every used expert on demand, no cache, no prefetch,
    no CPU compute.
    """

    gpu_memory: float | None = field(default=None, metadata=option(
        "GiB of GPU memory for weights, activations, KV blocks and expert slots; turns "
        "expert offloading on: routed experts live in pinned CPU memory, a GPU expert cache "
        "shares one arena with the KV pool, and the split moves with the workload",
        metavar="GIB",
    ))  # fmt: skip
    expert_slots: int | None = field(default=None, metadata=option(
        "exact number of GPU expert slots at start (also turns offloading on)",
        metavar="N",
    ))  # fmt: skip
    expert_fraction: float = 0.5
    policy: ExpertCachePolicy = field(default="lfru", metadata=option(
        "expert eviction: lfru (layer-aware frequency, default) or lru",
        keyword="expert_cache_policy",
    ))  # fmt: skip
    prefetch: bool = field(default=True, metadata=option(
        "do not copy the experts that layer i+1's router predicts from layer i early",
        keyword="expert_prefetch", flag="--no-expert-prefetch",
    ))  # fmt: skip
    cpu_compute: ExpertCPUCompute = field(default="auto", metadata=option(
        "compute missing experts on the CPU: auto (a start-up cost model decides), on, off",
        keyword="expert_cpu_compute",
    ))  # fmt: skip
    miss_precision: ExpertMissPrecision = field(default="full", metadata=option(
        "on a miss of a low-importance expert, load an int8/int4 copy (default full)",
        keyword="expert_miss_precision",
    ))  # fmt: skip
    low_precision_threshold: float = field(default=0.1, metadata=option(
        "a miss loads low precision when all its gate weights are below W (default 0.1)",
        keyword="expert_low_precision_threshold", metavar="W",
    ))  # fmt: skip
    rebalance_interval: int = field(default=32, metadata=option(
        "steps between KV/expert budget decisions; 0 keeps the split fixed (default 32)",
        metavar="STEPS",
    ))  # fmt: skip
    naive: bool = False

    def __post_init__(self) -> None:
        if self.gpu_memory is not None and self.gpu_memory <= 0:
            raise ValueError(f"gpu_memory must be > 0 GiB, got {self.gpu_memory}")
        if self.expert_slots is not None:
            check_at_least_one("expert_slots", self.expert_slots)
        if not 0.0 < self.expert_fraction < 1.0:
            raise ValueError(f"expert_fraction must be in (0, 1), got {self.expert_fraction}")
        check_choices(self)
        if not 0.0 <= self.low_precision_threshold <= 1.0:
            raise ValueError(
                f"low_precision_threshold is a gate weight in [0, 1], "
                f"got {self.low_precision_threshold}"
            )
        if self.rebalance_interval < 0:
            raise ValueError(f"rebalance_interval must be >= 0, got {self.rebalance_interval}")

    @property
    def enabled(self) -> bool:
        return self.gpu_memory is not None or self.expert_slots is not None


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor parallelism over the devices of one host: rank 0 is the engine's own process,
    ranks 1..N-1 are worker processes it starts (strata/engine/tp)."""

    tensor_parallel_size: int = field(default=1, metadata=option(
        "shard the model over N ranks of this host (torch.distributed: NCCL on CUDA, one GPU "
        "a rank; gloo on CPU); N must divide the attention heads (default 1)",
        metavar="N",
    ))  # fmt: skip
    port: int | None = field(default=None, metadata=option(
        "TCP port on 127.0.0.1 where the ranks meet (default: a free port)",
        keyword="tp_port", metavar="PORT",
    ))  # fmt: skip
    timeout_s: float = field(default=60.0, metadata=option(
        "seconds a rank may be silent inside a step before the engine fails with an "
        "error naming it (default 60)",
        keyword="tp_timeout", metavar="SECONDS",
    ))  # fmt: skip

    def __post_init__(self) -> None:
        if isinstance(self.tensor_parallel_size, bool) or self.tensor_parallel_size < 1:
            raise ValueError(
                f"tensor_parallel_size must be a whole number >= 1, got {self.tensor_parallel_size}"
            )
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ValueError(f"tp_port must be a TCP port in [1, 65535], got {self.port}")
        if not self.timeout_s > 0:
            raise ValueError(f"tp_timeout must be > 0 seconds, got {self.timeout_s}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine is built from. cuda_graph_max_batch: the largest decode batch
    captured in a CUDA graph; capped at max_num_seqs."""

    model: str | None = field(default=None, metadata=option(
        "a Hugging Face model folder (config.json + safetensors), a .gguf file, "
        "random:PRESET (llama-3-8b, llama-3.2-1b, qwen2.5-7b, qwen2.5-0.5b, mistral-7b, "
        "smollm2-135m, olmoe-1b-7b, qwen3-30b-a3b, mixtral-8x7b, qwen1.5-moe-a2.7b) or "
        "random:CONFIG.json for random weights of that shape. "
        "Default: the embedded SmolLM2-135M-Instruct.",
    ))  # fmt: skip
    device: str | None = field(default=None, metadata=option(
        "cpu, cuda or cuda:N (default: cuda if available)",
    ))  # fmt: skip
    dtype: Dtype = field(default="auto", metadata=option(
        "weights and KV dtype; auto = float32 on CPU, bfloat16 on CUDA",
    ))  # fmt: skip
    seed: int = field(default=0, metadata=option("engine seed (random weights, unseeded requests)"))
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    attention_backend: AttentionBackendName = field(default="auto", metadata=option(
        "attention kernels; auto = triton on CUDA when triton imports, else reference",
    ))  # fmt: skip
    enforce_eager: bool = field(default=False, metadata=option(
        "run decode steps eagerly instead of replaying captured CUDA graphs",
        flag="--no-cuda-graphs",
    ))  # fmt: skip
    cuda_graph_max_batch: int = 256
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        check_choices(self)
        if self.parallel.tensor_parallel_size > 1:
            self._check_tensor_parallel()
        if self.device is not None and not (
            self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")
        ):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N'; got {self.device!r}")
        if self.cuda_graph_max_batch <= 0:
            raise ValueError(f"cuda_graph_max_batch must be > 0, got {self.cuda_graph_max_batch}")

    def _check_tensor_parallel(self) -> None:
        """What tensor parallelism does not run with yet: a clear refusal, not a wrong answer."""
        n = self.parallel.tensor_parallel_size
        refused = {
            "expert offloading (expert_gpu_memory / expert_slots)": self.moe.enabled,
            "overlap_scheduling on (its workers take each step's ids from the host)": (
                self.scheduler.overlap == "on"
            ),
            "kv_recall_prefetch (its predicted picks would need the ranks' all-reduce on a "
            "side stream)": self.cache.recall.prefetch,
        }
        for what, on in refused.items():
            if on:
                raise ValueError(f"tensor_parallel_size {n} does not run with {what} yet")


# Every engine option: the `LLM(...)` keywords and the engine's command-line flags.
ENGINE_OPTIONS: tuple[OptionField, ...] = flatten(EngineConfig)
