"""The import rules of docs/architecture.md ("What may import what"), read from the source.

Each module's imports are collected with ``ast`` (relative imports resolved), split into
those made at import time (module level) and those made inside functions (lazy).
"""

from __future__ import annotations

import ast
from pathlib import Path

import gradzip
import pytest

PKG = Path(gradzip.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(module-level, inside-functions) gradzip/torch.distributed modules that ``path``
    imports, as dotted names."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    top, lazy = set(), set()

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            found = []
            if isinstance(child, ast.Import):
                found = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - child.level + 1]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                # "from . import x" imports the submodule x
                found = [mod] + [f"{mod}.{a.name}" for a in child.names]
            (lazy if inner else top).update(found)
            visit(child, inner)

    visit(tree, False)
    keep = {m for m in top | lazy if m.startswith(("gradzip", "torch.distributed"))}
    return top & keep, lazy & keep


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(name: str) -> tuple[set[str], set[str]]:
    return _imports(MODULES[name])


def _touches(imported: set[str], target: str) -> bool:
    return any(m == target or m.startswith(target + ".") for m in imported)


def test_the_modules_are_found():
    for name in ("gradzip.comm", "gradzip.comm.plan", "gradzip.ddp", "gradzip.ops",
                 "gradzip.reference", "gradzip.spec"):
        assert name in MODULES, sorted(MODULES)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n not in (
    "gradzip", "gradzip.selftest", "gradzip.testing", "gradzip.reference", "gradzip.ops")))
def test_production_code_does_not_import_the_reference(name):
    top, lazy = imports_of(name)
    assert not _touches(top | lazy, "gradzip.reference"), name


def test_ops_uses_the_reference_only_as_a_lazy_backend():
    top, _ = imports_of("gradzip.ops")
    assert not _touches(top, "gradzip.reference")


# optim sits above ddp, as the integrations do (its compressed warm-up is a CompressionState)
@pytest.mark.parametrize("name", sorted(n for n in MODULES if n not in (
    "gradzip.ddp", "gradzip.optim") and not n.startswith("gradzip.integrations")))
def test_nothing_below_ddp_imports_it(name):
    top, lazy = imports_of(name)
    assert not _touches(top | lazy, "gradzip.ddp"), name


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith(
    "gradzip.integrations.")))
def test_integrations_go_through_ddp(name):
    top, lazy = imports_of(name)
    gz = {m for m in top | lazy if m.startswith("gradzip")}
    assert all(m == "gradzip" or m.startswith(("gradzip.ddp", "gradzip.integrations"))
               for m in gz), gz


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not n.startswith(
    "gradzip.integrations")))
def test_nothing_imports_the_integrations(name):
    top, lazy = imports_of(name)
    assert not _touches(top | lazy, "gradzip.integrations"), name


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n != "gradzip.optim"))
def test_nothing_imports_the_optimizer(name):
    top, lazy = imports_of(name)
    assert not _touches(top | lazy, "gradzip.optim"), name


def test_the_optimizer_goes_through_comm():
    top, lazy = imports_of("gradzip.optim")
    gz = {m for m in top | lazy if m.startswith("gradzip")}
    allowed = ("gradzip.comm", "gradzip.codecs", "gradzip._checks")
    # from ddp only the hook's state, for the compressed warm-up, and its graph-break raise
    ddp = {"gradzip.ddp", "gradzip.ddp.CompressionState", "gradzip.ddp._refuse_in_graph"}
    assert all(m == "gradzip" or m in ddp or m.startswith(allowed) for m in gz), gz


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("gradzip.comm")))
def test_comm_goes_through_codecs(name):
    top, lazy = imports_of(name)
    for banned in ("gradzip.ops", "gradzip.reference", "gradzip.triton", "gradzip.ddp"):
        assert not _touches(top | lazy, banned), (name, banned)


def test_the_plan_is_pure():
    top, lazy = imports_of("gradzip.comm.plan")
    assert not _touches(top | lazy, "torch.distributed")


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not n.startswith(
    ("gradzip.comm", "gradzip.ddp", "gradzip.fsdp", "gradzip.optim",
     "gradzip.integrations")) and n not in (
        "gradzip", "gradzip.selftest", "gradzip.testing")))
def test_the_ops_layer_knows_nothing_of_communication(name):
    top, lazy = imports_of(name)
    assert not _touches(top | lazy, "gradzip.comm"), name
    assert not _touches(top | lazy, "torch.distributed"), name


@pytest.mark.parametrize("name", ["gradzip.reference", "gradzip.spec", "gradzip.format",
                                  "gradzip._checks"])
def test_the_foundations_import_almost_nothing(name):
    top, lazy = imports_of(name)
    extra = {m for m in top | lazy if m.startswith("gradzip") and m not in (
        "gradzip.spec", "gradzip.format") and not m.startswith(("gradzip.spec.",
                                                               "gradzip.format."))}
    # "from . import format as fmt" shows as gradzip and gradzip.format
    extra.discard("gradzip")
    assert not extra, (name, extra)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n not in (
    "gradzip.selftest", "gradzip.testing")))
def test_nothing_in_the_library_imports_the_test_helpers(name):
    top, lazy = imports_of(name)
    for banned in ("gradzip.testing", "gradzip.selftest"):
        if name == "gradzip" and banned == "gradzip.selftest":
            continue
        assert not _touches(top | lazy, banned), (name, banned)
