"""Per-step attention metadata: what `AttentionBackend.prepare` builds once per step and
every layer reads.

    AttentionMetadata       one backend's device tensors for the step (a subclass per
                            backend); every layer attends with the same one
    LayerwiseMetadata[M]    one M per layer, for steps whose layers attend over different
                            KV (their own block tables, lengths or slots); built by
                            `AttentionBackend.prepare_layers`

The model asks `meta.for_layer(i)` either way and hands the result to the backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeAlias, TypeVar

from torch import Tensor


class AttentionMetadata:
    """Base of a backend's per-step metadata.

    slot_mapping: [tokens] int64, the cache slot (block * block_size + offset) each of
    the step's tokens writes its K/V to; a negative slot writes nothing (graph padding).
    """

    slot_mapping: Tensor

    def for_layer(self, layer: int) -> AttentionMetadata:
        """The metadata layer `layer` attends with: the same for every layer."""
        return self


M = TypeVar("M", bound=AttentionMetadata)


@dataclass(frozen=True)
class LayerwiseMetadata(Generic[M]):
    """A step's metadata per layer; layers that share KV geometry share one object."""

    per_layer: Sequence[M]

    def for_layer(self, layer: int) -> M:
        return self.per_layer[layer]


# What the model receives for a step.
StepMetadata: TypeAlias = AttentionMetadata | LayerwiseMetadata[Any]
