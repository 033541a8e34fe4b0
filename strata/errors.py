"""Exceptions that Strata raises for problems a user can fix.

Each message names the problem and the limit it broke, so it can be shown to a user as is.
"""


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
