"""ModelPlacement: a loaded model where it runs, with the limits its steps respect.

What sizing code needs (the warm-up step, the MoE budget split) without an engine."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from strata.config import ModelConfig, SchedulerConfig
from strata.models.llama import LlamaModel


@dataclass(frozen=True)
class ModelPlacement:
    model: LlamaModel
    model_config: ModelConfig
    scheduler: SchedulerConfig
    block_size: int
    max_model_len: int
    dtype: torch.dtype
    device: torch.device
