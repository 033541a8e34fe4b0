"""Import Strata's Triton kernel modules under Triton's interpreter, for CPU tests.

TRITON_INTERPRET is read when a kernel is decorated, so `interpreted` sets it, imports the
modules afresh, and on exit restores the variable and drops them: no other test sees
interpreted kernels. Triton itself is usually imported already (torch and transformers
import it), so its own jit helpers (tl.max, tl.sum, ...) were decorated for compilation;
interpreted twins stand in for them meanwhile.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest


@contextlib.contextmanager
def interpreted(module: str, drop_prefix: str | None = None) -> Iterator[ModuleType]:
    """`module`, imported under the interpreter; modules named `drop_prefix`... (default:
    `module` alone) are dropped before and after."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def drop() -> None:
        for name in [n for n in sys.modules if n.startswith(drop_prefix or module)]:
            del sys.modules[name]

    with pytest.MonkeyPatch.context() as mp, _language_restored(tl):
        mp.setenv("TRITON_INTERPRET", "1")
        for lang in (tl, tl.standard):
            for name, value in vars(lang).items():
                if isinstance(value, JITFunction):
                    mp.setattr(lang, name, InterpretedFunction(value.fn))
        drop()
        try:
            yield importlib.import_module(module)
        finally:
            drop()


@contextlib.contextmanager
def _language_restored(tl: ModuleType) -> Iterator[None]:
    """Put back every attribute of triton.language's modules and classes as it was: a call
    of an interpreted device function (the twins above) patches them for the interpreter
    and leaves them so, which would break compiling kernels later in the process."""
    owners = [tl, tl.core, tl.math, tl.standard, tl.tensor, tl.dtype]
    owners.append(tl.core.tensor_descriptor_base)
    owners += [tl.condition] if hasattr(tl, "condition") else []
    before = [(owner, dict(vars(owner))) for owner in owners]
    try:
        yield
    finally:
        for owner, attributes in before:  # (names it added stay: rewritten kernels use them)
            for name, value in list(vars(owner).items()):
                if name in attributes and attributes[name] is not value:
                    setattr(owner, name, attributes[name])
