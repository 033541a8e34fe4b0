"""Run Triton's compiler front end (Python AST -> Triton IR) for a kernel on the CPU.

The interpreter (triton_interpret.py) runs a kernel's arithmetic but not the compiler's
checks: a name bound to values of two types in the branches of an `if`, a global that is
not a constexpr, an operand of the wrong type. `lower` records the launch a wrapper makes
(its grid, arguments and constexprs), builds the signature from them as a GPU launch
would (tensors as typed pointers, ints, floats), and lowers the kernel to Triton IR for
an sm_90 target. That step needs no GPU; only code generation does.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
import torch

POINTER = {
    torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
    torch.int64: "*i64", torch.int32: "*i32", torch.int8: "*i8", torch.uint8: "*u8",
    torch.bool: "*i1",
}  # fmt: skip
LAUNCH_OPTIONS = {"num_warps", "num_stages", "num_ctas", "maxnreg"}


def _type(value: Any) -> str:
    if isinstance(getattr(value, "dtype", None), torch.dtype):  # a tensor, or a pointer to one
        return POINTER[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def lower(module: ModuleType, call: Callable[[], object]) -> dict[str, list[str]]:
    """The Triton IR of each kernel launch that `call` makes of `module`'s kernels, by
    kernel name (the launches are recorded, not run)."""
    from triton.runtime.jit import JITFunction

    kernels = {n: k for n, k in vars(module).items() if isinstance(k, JITFunction)}
    launches: list[tuple[str, dict[str, Any]]] = []

    def recorder(name: str) -> object:
        names = kernels[name].arg_names

        class Recorder:
            def __getitem__(self, grid: object) -> Callable[..., None]:
                def launch(*args: Any, **kwargs: Any) -> None:
                    named = dict(zip(names, args, strict=False))
                    named.update({k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
                    launches.append((name, named))

                return launch

        return Recorder()

    with pytest.MonkeyPatch.context() as mp:
        for name in kernels:
            mp.setattr(module, name, recorder(name))
        call()
    irs: dict[str, list[str]] = {}
    for name, named in launches:
        irs.setdefault(name, []).append(_make_ir(kernels[name], named))
    return irs


def _make_ir(jit: Any, named: dict[str, Any]) -> str:
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    options = backend.parse_options({})
    signature, constexprs = {}, {}
    for i, (name, param) in enumerate(zip(jit.arg_names, jit.params, strict=True)):
        if param.is_constexpr:
            signature[name], constexprs[(i,)] = "constexpr", named[name]
        else:
            signature[name] = _type(named[name])
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    source = ASTSource(jit, signature, constexprs=constexprs)
    made = source.make_ir(target, options, backend.get_codegen_implementation(options),
                          backend.get_module_map(), context)  # fmt: skip
    return str(made)
