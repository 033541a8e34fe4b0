"""Strata: LLM inference for models whose working memory does not fit on the GPU."""

from strata.engine.engine import LLMEngine
from strata.engine.llm import LLM
from strata.engine.outputs import RequestOutput, TokenLogprobs
from strata.engine.sampling_params import SamplingParams
from strata.engine.structured_output import StructuredOutput
from strata.errors import (
    InvalidRequestError,
    KVCacheTooSmallError,
    ModelLoadError,
    StrataError,
    UnsupportedModelError,
)

__all__ = [
    "LLM",
    "InvalidRequestError",
    "KVCacheTooSmallError",
    "LLMEngine",
    "ModelLoadError",
    "RequestOutput",
    "SamplingParams",
    "StrataError",
    "StructuredOutput",
    "TokenLogprobs",
    "UnsupportedModelError",
]
__version__ = "0.1.0"
