"""Exceptions that Strata raises for problems a user can fix.

Each message names the problem and the limit it broke, so it can be shown to a user as is.
"""

from collections.abc import Iterator
from contextlib import contextmanager


class StrataError(Exception):
    """Base class of every error Strata raises on purpose."""


class InvalidRequestError(StrataError, ValueError):
    """A request (prompt or sampling parameters) that cannot be served as given.

    `param` names the request field at fault where one is (the server reports it)."""

    def __init__(self, message: str = "", param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    """A prompt (plus the tokens asked for) longer than the context the engine serves."""


class ModelLoadError(StrataError):
    """A model path that does not exist, cannot be read, or holds no usable weights."""


class UnsupportedModelError(ModelLoadError):
    """A model whose architecture Strata does not implement."""


class KVCacheTooSmallError(StrataError):
    """A KV block pool that cannot hold even one sequence of the configured length."""


class RequestFailedError(StrataError):
    """A request that the engine failed while running it (an exception in a step)."""


class SequenceFault(StrataError):
    """An exception raised by work done for one request alone (its sampling parameters,
    its KV policy, its tier load). That request fails with this message; the step goes on
    for the others. Raised through `blame`; never for an engine fault (`is_engine_fault`).
    """

    def __init__(self, request_id: str, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.request_id = request_id
        self.cause = cause


class TensorParallelError(StrataError):
    """A tensor-parallel rank died, hung past the timeout, or failed to start: the engine
    cannot run another step (every rank holds part of each layer)."""


# Exceptions that say the device or the process is broken, not one request: out of
# memory, a CUDA fault. They fail the engine loudly; `blame` never converts them.
_ENGINE_FAULT_NAMES = frozenset(
    {"OutOfMemoryError", "AcceleratorError", "KVIntegrityError", "TensorParallelError"}
)
_ENGINE_FAULT_MARKERS = ("CUDA error", "CUDA out of memory", "device-side assert")


def is_engine_fault(exc: BaseException) -> bool:
    """True for out-of-memory, device faults and a corrupt KV pool (matched by name, so
    that this base module needs no torch)."""
    if isinstance(exc, SequenceFault):
        return False
    if isinstance(exc, MemoryError) or not isinstance(exc, Exception):
        return True
    if any(c.__name__ in _ENGINE_FAULT_NAMES for c in type(exc).__mro__):
        return True
    return any(marker in str(exc) for marker in _ENGINE_FAULT_MARKERS)


@contextmanager
def blame(request_id: str) -> Iterator[None]:
    """Attribute an exception raised inside to one request: re-raised as SequenceFault,
    unless it is an engine fault (then re-raised as is)."""
    try:
        yield
    except SequenceFault:
        raise
    except Exception as exc:
        if is_engine_fault(exc):
            raise
        raise SequenceFault(request_id, exc) from exc
