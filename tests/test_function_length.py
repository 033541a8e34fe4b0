"""Every function in strata/ reads at once: at most 60 lines. Triton kernel bodies
(@triton.jit) are exempt: a kernel is one unit that the compiler sees whole."""

from __future__ import annotations

import ast
from pathlib import Path

import strata

MAX_LINES = 60
ROOT = Path(strata.__file__).parent


def is_kernel(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(target, ast.Attribute) and target.attr in ("jit", "autotune"):
            return True
    return False


def test_no_function_is_longer_than_60_lines() -> None:
    long = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not is_kernel(node):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines}")
    assert not long, "\n".join(long)
