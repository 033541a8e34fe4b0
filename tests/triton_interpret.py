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

    with pytest.MonkeyPatch.context() as mp:
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
