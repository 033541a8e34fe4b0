"""Strata's packages form layers: a package imports only packages of lower layers (or its
own), so there are no import cycles between packages. Checked from the source with ast,
including imports inside functions and under TYPE_CHECKING.

    apps      cli, env_report, bench, eval, server, sim
    engine    engine
    moe       moe                 (expert offloading, over models and kv)
    models    models
    kv        kv                  (blocks, prefix, tiers, policies, codecs)
    attention attention
    ops       ops                 (fused kernels: norms, activations, RoPE, grouped experts)
    base      config, options, registry, errors, pinned, timing
"""

from __future__ import annotations

import ast
from pathlib import Path

import strata

LAYERS: list[set[str]] = [
    {"timing", "pinned", "errors", "registry", "options", "config"},
    {"ops"},
    {"attention"},
    {"kv"},
    {"models"},
    {"moe"},
    {"engine"},
    {"server", "bench", "eval", "cli", "env_report", "commands", "flags", "engine_flags", "sim"},
]
# Within the base layer, the order of the modules themselves.
BASE_ORDER = ["timing", "pinned", "errors", "registry", "options", "config"]
ROOT = Path(strata.__file__).parent


def layer_of(package: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if package in names)


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "strata" and len(parts) > 1:
                found.add(parts[1])
    return found


def package_of(path: Path) -> str:
    return path.relative_to(ROOT).parts[0].removesuffix(".py")


def test_every_package_has_a_layer() -> None:
    packages = {package_of(p) for p in ROOT.rglob("*.py")} - {"__init__"}
    assert packages <= set().union(*LAYERS), packages - set().union(*LAYERS)


def test_packages_import_only_lower_layers() -> None:
    violations = []
    for path in sorted(ROOT.rglob("*.py")):
        source = package_of(path)
        if source == "__init__":
            continue
        for target in imported_packages(path) - {source}:
            if layer_of(target) > layer_of(source):
                violations.append(f"{path.relative_to(ROOT)} imports strata.{target}")
            elif layer_of(target) == layer_of(source) == 0:
                if BASE_ORDER.index(target) > BASE_ORDER.index(source):
                    violations.append(f"{path.relative_to(ROOT)} imports strata.{target}")
            elif layer_of(target) == layer_of(source) and layer_of(source) < len(LAYERS) - 1:
                violations.append(f"{path.relative_to(ROOT)} imports its peer strata.{target}")
    assert not violations, "\n".join(violations)
