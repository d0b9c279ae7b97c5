"""The package layers: nothing below ``bundle.engines`` imports it, and ``bundle.runtime`` imports no other layer."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bundle"
LOWER = ("data", "transforms", "metrics", "networks", "losses", "inferers", "diffusion", "handlers")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_lower_package_imports_engines():
    offenders = []
    for layer in LOWER:
        for path in (PACKAGE / layer).rglob("*.py"):
            bad = [m for m in _imports(path) if m == "bundle.engines" or m.startswith("bundle.engines.")]
            if bad:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}: {bad}")
    assert not offenders, "lower layers import bundle.engines:\n" + "\n".join(offenders)


def test_runtime_helpers_import_no_other_bundle_module():
    assert not [m for m in _imports(PACKAGE / "runtime.py") if m.startswith("bundle")]
    assert not [m for m in _imports(PACKAGE / "files.py") if m.startswith("bundle")]


def test_inferers_do_not_depend_on_any_method():
    """The ensemble inferer drives samplers through their interface only: no network or diffusion import."""
    for path in (PACKAGE / "inferers").rglob("*.py"):
        bad = [m for m in _imports(path) if m.startswith(("bundle.networks", "bundle.diffusion", "bundle.engines"))]
        assert not bad, f"{path.name} imports {bad}"
