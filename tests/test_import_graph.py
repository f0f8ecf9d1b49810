"""The project's own import graph: which package may import which (issue 40), and no circles (issue 11).

Static, so lazy imports inside functions count too; and no module loads another by name at run time
(``importlib.import_module``, ``__import__``), which would hide an edge from this test.

Layers, bottom up: ``lraee_core`` <- ``training.pipeline`` <- ``training.embedded``, and ``lraee_core`` <- ``app``.
``bench``, ``deploy`` and ``docs`` read what they need; nothing reads them (tests aside, which read everything).
"""

from __future__ import annotations

import ast
from pathlib import Path

from lraee_core.paths import REPO_ROOT

ROOT = REPO_ROOT
PACKAGES = ("lraee_core", "app", "training", "bench", "deploy", "docs")
# Each layer and the layers it may import (itself included). Packages are matched by the longest prefix.
MAY_IMPORT: dict[str, set[str]] = {
    "lraee_core": {"lraee_core"},
    "app": {"lraee_core", "app"},
    "training": {"training"},  # the package's own __init__
    "training.pipeline": {"lraee_core", "training", "training.pipeline"},
    "training.embedded": {"lraee_core", "training", "training.pipeline", "training.embedded"},
    "deploy": {"lraee_core", "app", "deploy"},
    "bench": {"lraee_core", "app", "training", "training.pipeline", "training.embedded", "bench"},
    "docs": {"lraee_core", "app", "training", "training.pipeline", "training.embedded", "docs"},
}
RUN_TIME_IMPORTS = ("import_module", "__import__")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules ``name`` imports (``from x import y`` counts x, and x.y when y is a module)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join([*base, *([node.module] if node.module else [])])
            else:
                prefix = node.module or ""
            out.add(prefix)
            out.update(f"{prefix}.{alias.name}" for alias in node.names)
    return {module for module in out if module in modules and module != name}


def _layer(module: str) -> str:
    """The layer a module belongs to: the longest key of MAY_IMPORT it lies in."""
    return max((layer for layer in MAY_IMPORT if module == layer or module.startswith(layer + ".")), key=len)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles() -> None:
    graph = _graph()
    assert len(graph) > 50  # the scan found the packages
    assert _cycles(graph) == []


def test_no_circles_between_layers() -> None:
    layers: dict[str, set[str]] = {layer: set() for layer in MAY_IMPORT}
    for module, imported in _graph().items():
        layers[_layer(module)].update(_layer(other) for other in imported if _layer(other) != _layer(module))
    assert _cycles(layers) == []


def test_every_import_stays_in_its_layers() -> None:
    upward = sorted(
        f"{module} imports {other}"
        for module, imported in _graph().items()
        for other in imported
        if _layer(other) not in MAY_IMPORT[_layer(module)]
    )
    assert upward == []


def test_the_layers_say_what_the_design_says() -> None:
    """lraee_core imports nothing of the project's other packages; the pipeline only lraee_core and itself; the
    embedded package may import the pipeline, never the reverse; nothing imports bench, deploy or docs."""
    assert MAY_IMPORT["lraee_core"] == {"lraee_core"}
    assert MAY_IMPORT["training.pipeline"] == {"lraee_core", "training", "training.pipeline"}
    assert "training.pipeline" in MAY_IMPORT["training.embedded"]
    for top in ("bench", "deploy", "docs"):
        assert all(top not in allowed for layer, allowed in MAY_IMPORT.items() if layer != top)


def test_no_module_is_loaded_by_name() -> None:
    found = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if called in RUN_TIME_IMPORTS:
                    found.append(f"{module}:{node.lineno}")
    assert found == []


def test_the_scan_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_scan_places_modules_in_their_layers() -> None:
    assert _layer("training.embedded.reports.quant_modes") == "training.embedded"
    assert _layer("training.pipeline.cli") == "training.pipeline"
    assert _layer("lraee_core.backends.torch") == "lraee_core"
    assert _layer("docs.examples") == "docs"
