"""The package's public API and its import structure: one loader, no import circles in any package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lraee_core
from lraee_core.paths import REPO_ROOT

ROOT = REPO_ROOT
PACKAGES = ("lraee_core", "training", "app", "bench")


def test_the_public_api_is_importable_from_the_package() -> None:
    from lraee_core import EarlyExitClassifier, ExitResult, Manifest, load_classifier, load_image
    from lraee_core.checkpoint import load_classifier as checkpoint_loader

    assert load_classifier is checkpoint_loader  # one loader
    assert not hasattr(EarlyExitClassifier, "from_checkpoint")
    assert {ExitResult.__name__, Manifest.__name__, load_image.__name__} <= set(lraee_core.__all__)
    assert all(hasattr(lraee_core, name) for name in lraee_core.__all__)
    assert issubclass(lraee_core.ImageError, lraee_core.InputError)
    assert issubclass(lraee_core.CheckpointError, lraee_core.LraeeError)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_at_load(path: Path, module: str) -> set[str]:
    """Modules imported when ``module`` is loaded: top-level imports, not those inside functions or TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def _import_graph(package: str) -> dict[str, set[str]]:
    files = {_module_name(path): path for path in (ROOT / package).rglob("*.py")}
    graph = {}
    for module, path in files.items():
        # A submodule's import loads its package's __init__ first, which is no circle of the submodule's making.
        graph[module] = {name for name in _imports_at_load(path, module) if name in files and name != module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circles(package: str) -> None:
    graph = _import_graph(package)
    # Package __init__ files re-export their submodules by design; an edge back into the package's own __init__
    # from one of its submodules would be a real circle, and is caught like any other edge.
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph) or [])}"


def test_the_circle_finder_finds_circles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
