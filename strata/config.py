"""Frozen configuration dataclasses. Each validates itself on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    def expert_params(self) -> int:
        """Parameters of one routed expert (gate, up and down projections)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

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
    layers = range(hf_config.num_hidden_layers)
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


@dataclass(frozen=True)
class TierConfig:
    """The KV tiers below the GPU pool; all off by default.

    cpu_memory: GiB of (pinned, on CUDA hosts) CPU memory for the CPU tier. Disk and
    remote tiers stage through it, so it defaults to STAGING_GIB when only they are set.
    disk_dir / disk_size: a local disk tier directory and its cap in GiB.
    remote: "valkey://host:port" or "redis://host:port[/db]", shared by any number of
    engines; remote_timeout_s bounds each network call (a slow or dead server is a miss).
    eviction: the tiers' eviction order ("lru" or "fifo").
    preemption_mode: "recompute" frees a preempted sequence's blocks; "swap" also pins
    them in the CPU tier until it resumes; "auto" swaps when reloading is estimated to be
    cheaper than recomputing.
    session_gpu_fraction: the share of the GPU pool that session pins may hold.
    """

    cpu_memory: float | None = None
    disk_dir: str | None = None
    disk_size: float = 16.0
    remote: str | None = None
    remote_timeout_s: float = 0.5
    eviction: str = "lru"
    preemption_mode: str = "auto"
    session_gpu_fraction: float = 0.25

    STAGING_GIB = 1.0
    PREEMPTION_MODES = ("recompute", "swap", "auto")
    EVICTION_ORDERS = ("lru", "fifo")

    def __post_init__(self) -> None:
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
        if self.eviction not in self.EVICTION_ORDERS:
            raise ValueError(
                f"kv tier eviction must be one of {', '.join(self.EVICTION_ORDERS)}; "
                f"got {self.eviction!r}"
            )
        if self.preemption_mode not in self.PREEMPTION_MODES:
            raise ValueError(
                f"preemption_mode must be one of {', '.join(self.PREEMPTION_MODES)}; "
                f"got {self.preemption_mode!r}"
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
class CacheConfig:
    """The paged KV cache.

    kv_cache_memory: GiB for the block pool. None picks a default: on CUDA,
    gpu_memory_utilization of the device memory minus the peak measured in a warm-up;
    on CPU, DEFAULT_CPU_KV_GIB.
    num_blocks: an exact block count; overrides kv_cache_memory (tests, reproductions).
    kv_cache_dtype: the block codec (strata/kv/codec.py): "auto" stores K/V in the model
    dtype; "fp8", "int8", "int4", "int2" store complete blocks coded (more blocks per GiB)
    and keep each sequence's open block in full precision.
    kv_policy / kv_budget: the KV eviction policy a request gets when it names none
    (strata/kv/policies/registry.py), and its budget: a fraction of the context if < 1,
    a number of tokens if >= 1. "full" (the default) keeps everything.
    kv_evict_interval: decode steps between the evictions of a policy that evicts while
    decoding (streaming, h2o, tova, treekv). The cache grows to cap + interval - 1 slots
    and then evicts back to its cap, so one eviction frees whole blocks and the
    selection and compaction cost is paid once per interval. None: the block size;
    1: after every step, as the papers define them.
    """

    block_size: int = 16
    kv_cache_memory: float | None = None
    num_blocks: int | None = None
    gpu_memory_utilization: float = 0.90
    enable_prefix_caching: bool = True
    tiers: TierConfig = field(default_factory=TierConfig)
    kv_cache_dtype: str = "auto"
    kv_policy: str = "full"
    kv_budget: float | None = None
    kv_evict_interval: int | None = None

    DEFAULT_CPU_KV_GIB = 2.0
    KV_CACHE_DTYPES = ("auto", "fp8", "int8", "int4", "int2")

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 GiB, got {self.kv_cache_memory}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {self.num_blocks}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.kv_cache_dtype not in self.KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(self.KV_CACHE_DTYPES)}; "
                f"got {self.kv_cache_dtype!r}"
            )
        if self.tiers.enabled and not self.enable_prefix_caching:
            raise ValueError(
                "KV tiers store blocks under their prefix-cache keys: they need prefix caching on"
            )
        self._check_kv_policy()
        if self.kv_evict_interval is not None and self.kv_evict_interval < 1:
            raise ValueError(f"kv_evict_interval must be >= 1, got {self.kv_evict_interval}")

    @property
    def evict_interval(self) -> int:
        """kv_evict_interval resolved: the block size unless set."""
        return self.kv_evict_interval if self.kv_evict_interval is not None else self.block_size

    def _check_kv_policy(self) -> None:
        from strata.kv.policies.budget import check_budget
        from strata.kv.policies.registry import FULL, check_policy_name

        check_policy_name(self.kv_policy)
        if self.kv_budget is not None:
            check_budget(self.kv_budget)
        elif self.kv_policy != FULL:
            raise ValueError(
                f"kv_policy {self.kv_policy!r} needs a kv_budget: a fraction of the context "
                "in (0, 1) or a number of tokens >= 1"
            )


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits.

    max_num_batched_tokens: tokens computed in one step, prefill chunks and decodes together.
    max_num_seqs: sequences running at once.
    max_model_len: longest sequence (prompt + output); None means the model's context.
    """

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int | None = None

    def __post_init__(self) -> None:
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
    holds some of them.

    gpu_memory: GiB of GPU memory for everything (dense weights, activations, KV blocks
    and expert slots); the arena gets what the weights and a warm-up leave.
    expert_slots: the exact number of expert slots at start (tests, reproductions); the
    KV pool then comes from CacheConfig unless gpu_memory is set too.
    expert_fraction: share of the arena given to expert slots at start (capped at every
    expert, and so that one max_model_len sequence fits in KV).
    policy: expert cache eviction, "lfru" (layer-aware) or "lru".
    prefetch: copy the experts that layer i+1's router picks from layer i's input early.
    cpu_compute: "auto" (a start-up cost model decides per miss), "on" (every miss runs on
    the CPU) or "off".
    miss_precision: "full", or "int8"/"int4" to keep a low-precision copy of each expert
    and load it on a miss whose gate weights are all below low_precision_threshold.
    rebalance_interval: steps between decisions moving memory between KV and experts;
    0 keeps the split fixed.
    naive: benchmark baseline: copy every used expert on demand, no cache, no prefetch,
    no CPU compute.
    """

    gpu_memory: float | None = None
    expert_slots: int | None = None
    expert_fraction: float = 0.5
    policy: str = "lfru"
    prefetch: bool = True
    cpu_compute: str = "auto"
    miss_precision: str = "full"
    low_precision_threshold: float = 0.1
    rebalance_interval: int = 32
    naive: bool = False

    POLICIES = ("lfru", "lru")
    CPU_COMPUTE = ("auto", "on", "off")
    PRECISIONS = ("full", "int8", "int4")

    def __post_init__(self) -> None:
        if self.gpu_memory is not None and self.gpu_memory <= 0:
            raise ValueError(f"gpu_memory must be > 0 GiB, got {self.gpu_memory}")
        if self.expert_slots is not None and self.expert_slots < 1:
            raise ValueError(f"expert_slots must be >= 1, got {self.expert_slots}")
        if not 0.0 < self.expert_fraction < 1.0:
            raise ValueError(f"expert_fraction must be in (0, 1), got {self.expert_fraction}")
        if self.policy not in self.POLICIES:
            raise ValueError(
                f"expert cache policy must be one of {', '.join(self.POLICIES)}; "
                f"got {self.policy!r}"
            )
        if self.cpu_compute not in self.CPU_COMPUTE:
            raise ValueError(
                f"cpu_compute must be one of {', '.join(self.CPU_COMPUTE)}; "
                f"got {self.cpu_compute!r}"
            )
        if self.miss_precision not in self.PRECISIONS:
            raise ValueError(
                f"miss_precision must be one of {', '.join(self.PRECISIONS)}; "
                f"got {self.miss_precision!r}"
            )
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
class EngineConfig:
    """Everything the engine is built from.

    model: a Hugging Face folder, a .gguf file, "random:PRESET" or "random:CONFIG.json";
    None is the embedded SmolLM2-135M-Instruct.
    device: "cpu", "cuda", "cuda:N" or None (CUDA when available).
    dtype: "auto" (float32 on CPU, bfloat16 on CUDA), "float32", "bfloat16" or "float16".
    attention_backend: "auto" (triton on CUDA when triton imports, else reference),
    "reference" or "triton".
    enforce_eager: never capture CUDA graphs (decode steps then run eagerly too).
    cuda_graph_max_batch: the largest decode batch captured; capped at max_num_seqs.
    moe: expert offloading of a Mixture-of-Experts model (MoEConfig; off by default).
    """

    model: str | None = None
    device: str | None = None
    dtype: str = "auto"
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    attention_backend: str = "auto"
    enforce_eager: bool = False
    cuda_graph_max_batch: int = 256
    moe: MoEConfig = field(default_factory=MoEConfig)

    DTYPES = ("auto", "float32", "bfloat16", "float16")
    ATTENTION_BACKENDS = ("auto", "reference", "triton")

    def __post_init__(self) -> None:
        if self.dtype not in self.DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(self.DTYPES)}; got {self.dtype!r}")
        if self.device is not None and not (
            self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")
        ):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N'; got {self.device!r}")
        if self.attention_backend not in self.ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {', '.join(self.ATTENTION_BACKENDS)}; "
                f"got {self.attention_backend!r}"
            )
        if self.cuda_graph_max_batch <= 0:
            raise ValueError(f"cuda_graph_max_batch must be > 0, got {self.cuda_graph_max_batch}")
