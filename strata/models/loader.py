"""Load a model from a Hugging Face folder, a GGUF file, or `random:NAME`.

GGUF files are converted once by transformers (which de-quantizes to float32 and
restores the Hugging Face tensor layout) into a cached Hugging Face folder, so later
starts read plain safetensors:

    <cache>/gguf/<file stem>-<content digest>/{config.json, model.safetensors, tokenizer*}
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from strata.config import SUPPORTED_ARCHITECTURES, ModelConfig
from strata.errors import ModelLoadError, UnsupportedModelError
from strata.models.embedded import embedded_model_path
from strata.models.fingerprint import weights_fingerprint
from strata.models.llama import LlamaModel
from strata.models.moe import MoeModel
from strata.models.presets import random_config_dict
from strata.models.rope import RotaryEmbedding
from strata.models.routed_experts import ResidentExperts
from strata.models.tp.comm import Communicator
from strata.models.tp.layout import ShardLayout
from strata.models.tp.modules import shard_modules
from strata.models.tp.weights import cut_for, random_full_weights, shard_weights

logger = logging.getLogger("strata.loader")

CONVERSION_FORMAT = "strata-gguf/1"


@dataclass
class LoadedModel:
    model: LlamaModel
    config: ModelConfig
    tokenizer: Any | None
    eos_token_ids: frozenset[int]
    fingerprint: str
    name: str


def cache_dir() -> Path:
    return Path(os.environ.get("STRATA_CACHE_DIR", Path.home() / ".cache" / "strata"))


EMBEDDED_NAME = "smollm2-135m"


def model_name(spec: str | None) -> str:
    """The name a loaded model reports (and a server serves it under by default)."""
    return EMBEDDED_NAME if spec is None else spec


@dataclass(frozen=True)
class Placement:
    """Where weights go: the model on `device`; a MoE model's routed experts on
    `expert_device` (pinned when that is the CPU and `device` is CUDA)."""

    device: torch.device
    dtype: torch.dtype
    expert_device: torch.device
    comm: Communicator | None = None  # tensor parallelism: this rank's share only

    @property
    def wants_tokenizer(self) -> bool:
        """Tensor-parallel workers (ranks > 0) see token ids only."""
        return self.comm is None or self.comm.rank == 0

    @property
    def pin_experts(self) -> bool:
        return self.expert_device.type == "cpu" and self.device.type == "cuda"


def load_model(
    spec: str | None,
    device: torch.device,
    dtype: torch.dtype,
    max_positions: int | None,
    seed: int,
    expert_device: torch.device | None = None,
    comm: Communicator | None = None,
) -> LoadedModel:
    """Build the model `spec` names on `device` in `dtype`. None is the embedded model.

    expert_device: where a MoE model's routed experts are stacked (model.expert_weights);
    None is `device`. They are computed by ResidentExperts over those weights until
    model.set_routed_experts swaps in another RoutedExperts (strata/models/routed_experts.py).
    comm: build only this tensor-parallel rank's share (strata/models/tp); the LoadedModel's
    config is then the rank's local config."""
    place = Placement(device, dtype, expert_device or device, comm)
    if spec is None:
        path = embedded_model_path()
        return _load_hf_folder(gguf_to_folder(path), place, max_positions, EMBEDDED_NAME)
    if spec.startswith("random:"):
        return _load_random(spec[len("random:") :], place, max_positions, seed)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path does not exist: {path}")
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"model path is not readable: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf; pass a model folder or GGUF")
        path = gguf_to_folder(path)
    return _load_hf_folder(path, place, max_positions, spec)


def read_model_config(spec: str | None) -> ModelConfig:
    """The config of the model `spec` names (as load_model reads it), without its weights."""
    if spec is not None and spec.startswith("random:"):
        return ModelConfig.from_hf(_hf_config_from_dict(random_config_dict(spec[7:])))
    if spec is None:
        path = gguf_to_folder(embedded_model_path())
    else:
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            path = gguf_to_folder(path)
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read the config.json of {path}: {e}") from e
    return ModelConfig.from_hf(_hf_config_from_dict(raw))


# ---- Hugging Face folders --------------------------------------------------------------------


def _load_hf_folder(
    path: Path, place: Placement, max_positions: int | None, name: str
) -> LoadedModel:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} has no config.json; is it a Hugging Face model folder?")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {config_file}: {e}") from e
    hf_config = _hf_config_from_dict(raw)
    cfg = ModelConfig.from_hf(hf_config)
    files = _safetensors_files(path)
    model = _build(cfg, place, max_positions)
    layout = None if place.comm is None else _layout(cfg, place)
    model.load_weights(_iter_safetensors(files, layout))
    tokenizer = _load_tokenizer(path) if place.wants_tokenizer else None
    eos = _eos_ids(path, hf_config, tokenizer)
    return _loaded(model, model.config, tokenizer, eos, name)


def _loaded(
    model: LlamaModel,
    cfg: ModelConfig,
    tokenizer: Any | None,
    eos_token_ids: frozenset[int],
    name: str,
) -> LoadedModel:
    """The LoadedModel of a model whose weights are in place: a MoE model's routed experts
    are computed by ResidentExperts, and the fingerprint is taken."""
    _use_resident_experts(model)
    return LoadedModel(
        model=model,
        config=cfg,
        tokenizer=tokenizer,
        eos_token_ids=eos_token_ids,
        fingerprint=weights_fingerprint(model.named_weights()),
        name=name,
    )


def _hf_config_from_dict(raw: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_ARCHITECTURES.items())
        raise UnsupportedModelError(
            f"model_type {model_type!r} (architectures {raw.get('architectures')}) is not "
            f"supported; supported: {supported}"
        )
    fields = {k: v for k, v in raw.items() if k != "model_type"}
    return AutoConfig.for_model(model_type, **fields)


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / s for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{path} is missing shards listed in its index: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} holds no *.safetensors weights")
    return files


def _iter_safetensors(
    files: list[Path], layout: ShardLayout | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) pairs; load_weights copies each to where it belongs. With a
    tensor-parallel layout, each tensor is the rank's share, and only that is read."""
    from safetensors import SafetensorError, safe_open

    for file in tqdm(files, desc="Loading weights", unit="file", disable=len(files) < 2):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    if layout is None:
                        yield key, f.get_tensor(key)
                        continue
                    lazy = f.get_slice(key)
                    cut = cut_for(key, lazy.get_shape(), layout)
                    yield key, f.get_tensor(key) if cut is None else cut.apply(lazy)
        except (OSError, SafetensorError) as e:
            raise ModelLoadError(f"cannot read {file}: {e}") from e


def _load_tokenizer(path: Path) -> Any | None:
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        logger.info("no tokenizer in %s: prompts must be token ids", path)
        return None
    return AutoTokenizer.from_pretrained(str(path))


def _eos_ids(path: Path | None, hf_config: Any, tokenizer: Any | None) -> frozenset[int]:
    ids: set[int] = set()

    def add(value: Any) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))

    add(getattr(hf_config, "eos_token_id", None))
    if path is not None and (path / "generation_config.json").is_file():
        add(json.loads((path / "generation_config.json").read_text()).get("eos_token_id"))
    if tokenizer is not None:
        add(tokenizer.eos_token_id)
    return frozenset(ids)


# ---- random weights --------------------------------------------------------------------------


def _load_random(name: str, place: Placement, max_positions: int | None, seed: int) -> LoadedModel:
    hf_config = _hf_config_from_dict(random_config_dict(name))
    cfg = ModelConfig.from_hf(hf_config)
    model = _build(cfg, place, max_positions)
    std = getattr(hf_config, "initializer_range", 0.02)
    if place.comm is None:
        model.init_random(seed, std)
    else:  # the whole model's draws, each cut to this rank's share
        whole = _on_meta(cfg, place.dtype, max_positions or cfg.max_position_embeddings)
        drawn = random_full_weights(whole, seed, std, place.device, place.dtype)
        model.load_weights(shard_weights(drawn, _layout(cfg, place)))
    tokenizer = None
    if place.wants_tokenizer:
        tokenizer = _beside_config(name) or _embedded_tokenizer_if_fits(cfg.vocab_size)
    eos = _eos_ids(None, hf_config, None)
    return _loaded(model, model.config, tokenizer, eos, f"random:{name}")


def _beside_config(name: str) -> Any | None:
    """random:PATH/config.json takes a tokenizer saved in the same folder, if there is one."""
    folder = Path(name).parent
    if name.endswith(".json") and (folder / "tokenizer.json").is_file():
        return _load_tokenizer(folder)
    return None


def _embedded_tokenizer_if_fits(vocab_size: int) -> Any | None:
    """Random models borrow the embedded tokenizer when its ids fit in their vocabulary."""
    try:
        tokenizer = _load_tokenizer(gguf_to_folder(embedded_model_path()))
    except Exception as e:
        logger.info("random model without tokenizer (embedded one unavailable: %s)", e)
        return None
    if tokenizer is None or len(tokenizer) > vocab_size:
        return None
    return tokenizer


def _layout(cfg: ModelConfig, place: Placement) -> ShardLayout:
    assert place.comm is not None
    return ShardLayout(cfg, place.comm.rank, place.comm.size)


def _on_meta(cfg: ModelConfig, dtype: torch.dtype, positions: int) -> LlamaModel:
    """The model of `cfg` on the meta device, parameters in `dtype` (no memory)."""
    model_class = MoeModel if cfg.is_moe else LlamaModel
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in dtype: no float32 detour
    try:
        with torch.device("meta"):
            return model_class(cfg, positions)
    finally:
        torch.set_default_dtype(default_dtype)


def _build(cfg: ModelConfig, place: Placement, max_positions: int | None) -> LlamaModel:
    """The model with uninitialised weights where `place` says (MoE experts included);
    under tensor parallelism, the rank's share of it."""
    positions = max_positions or cfg.max_position_embeddings
    if place.comm is None:
        model = _on_meta(cfg, place.dtype, positions)
    else:
        layout = _layout(cfg, place)
        model = _on_meta(layout.local_config(), place.dtype, positions)
        with torch.device("meta"):
            shard_modules(model, layout, place.comm)
    device = place.device
    model = model.to_empty(device=device)
    if isinstance(model, MoeModel):
        model.allocate_experts(place.expert_device, place.dtype, place.pin_experts)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # Buffers do not survive to_empty; rope tables stay float32 whatever the weights' dtype.
    model.rope = RotaryEmbedding(cfg.hf_config, cfg.head_dim, positions).to(device)
    return model.eval()


def _use_resident_experts(model: LlamaModel) -> None:
    if isinstance(model, MoeModel):
        model.set_routed_experts(ResidentExperts(model.expert_weights))


# ---- GGUF ------------------------------------------------------------------------------------


def gguf_to_folder(path: Path) -> Path:
    """The cached Hugging Face folder converted from a GGUF file (made on first use)."""
    dest = cache_dir() / "gguf" / f"{path.stem}-{_file_digest(path)}"
    if (dest / "model.safetensors").is_file():
        return dest
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to %s (once; later starts read the cache)", path.name, dest)
    kwargs = {"gguf_file": path.name}
    try:
        hf_config = AutoConfig.from_pretrained(str(path.parent), **kwargs)
    except Exception as e:
        raise ModelLoadError(f"cannot read GGUF metadata of {path}: {e}") from e
    _hf_config_from_dict(hf_config.to_dict())  # raises for unsupported architectures
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), dtype=torch.float32, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    except Exception as e:
        raise ModelLoadError(f"cannot convert GGUF {path}: {e}") from e
    from safetensors.torch import save_file

    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hf_model.config.save_pretrained(tmp)
    if hf_model.generation_config is not None:
        hf_model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    if hf_model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def _file_digest(path: Path) -> str:
    """SHA-256 of the conversion format, size and first and last 4 MiB of the file."""
    size = path.stat().st_size
    h = hashlib.sha256(f"{CONVERSION_FORMAT}|{size}|".encode())
    with path.open("rb") as f:
        h.update(f.read(4 << 20))
        if size > 8 << 20:
            f.seek(size - (4 << 20))
            h.update(f.read())
    return h.hexdigest()[:16]
