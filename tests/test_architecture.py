"""The package's shape (docs/architecture.md), read from the source with ``ast``.

* no import circle between vfcore's modules, nor between its rooms (a top-level module or a
  sub-package counts as one room), counting every import: inside functions and under
  ``if TYPE_CHECKING:`` too;
* ``vfcore.dissect`` is analysis: it imports no ``train``, ``viz``, ``explorer``, ``export``,
  no matplotlib and not ``vfcore.analysis`` (the measurements beyond the paper import it, never
  the reverse);
* ``vfcore.dissect`` exports at most 30 names; its teaching core (capture, quantile, dissection,
  ranking, geometry) reaches nothing of ``vfcore.distributed``, directly or through other modules;
* no module over 600 lines;
* the run folder has one owner: only ``vfcore/run.py`` spells a run-folder path or a notebook.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vfcore"
MAX_LINES = 600
OWNED_BY_RUN = ("best.pt", "manifest.csv", "notebooks/0")
NOT_FROM_DISSECT = ("vfcore.train", "vfcore.viz", "vfcore.explorer", "vfcore.export", "vfcore.analysis",
                    "matplotlib")
#: The paper's Sec. 2.2-2.3 as notebooks 03 and 04 run it with one process (the teaching core);
#: ``vfcore.dissect.sharded`` and ``vfcore.dissect.artifacts`` are the shell around it.
CORE = ("vfcore.dissect.capture", "vfcore.dissect.quantile", "vfcore.dissect.dissection",
        "vfcore.dissect.ranking", "vfcore.dissect.geometry")
MAX_DISSECT_NAMES = 30


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imported(name: str, path: Path) -> set[str]:
    """Every absolute module name an import statement of the file names (anywhere in it)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            found.add(stem)
            found |= {f"{stem}.{a.name}" for a in node.names}   # `from pkg import submodule`
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> the vfcore modules it imports (a name is mapped to its longest module prefix)."""
    edges = {}
    for name, path in MODULES.items():
        targets = set()
        for t in _imported(name, path):
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t.startswith("vfcore") and t != name:
                targets.add(t)
        edges[name] = targets
    return edges


def _room(module: str) -> str:
    """``vfcore.dissect.ranking`` -> ``vfcore.dissect``: a sub-package is one room."""
    return ".".join(module.split(".")[:2])


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_imports_inside_functions_and_under_type_checking(tmp_path):
    """The walker itself: a made-up module with a lazy and a TYPE_CHECKING-only import."""
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import X\n"
                   "def f():\n    from vfcore.c import y\n")
    assert {"vfcore.dissect.b", "vfcore.c"} <= _imported("vfcore.dissect.m", src)
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle_between_modules():
    assert _circles(_graph()) == []


def test_no_import_circle_between_rooms():
    rooms: dict[str, set[str]] = {}
    for m, targets in _graph().items():
        for t in targets:
            if _room(m) != _room(t):
                rooms.setdefault(_room(m), set()).add(_room(t))
    assert _circles(rooms) == []


def test_dissect_draws_nothing_and_imports_no_upper_layer():
    bad = []
    for name, path in MODULES.items():
        if name == "vfcore.dissect" or name.startswith("vfcore.dissect."):
            for t in _imported(name, path):
                if any(t == f or t.startswith(f + ".") for f in NOT_FROM_DISSECT):
                    bad.append((name, t))
    assert bad == []


def test_dissect_exports_at_most_30_names():
    """``__all__`` is the whole public namespace (sub-modules aside) and has at most 30 names."""
    import types

    import vfcore.dissect as D

    public = {n for n, v in vars(D).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert len(D.__all__) <= MAX_DISSECT_NAMES
    assert public == set(D.__all__)


def test_the_core_reaches_nothing_of_distributed():
    """From each core module, following every vfcore import (also through forward, metrics, ...)."""
    graph = _graph()
    assert set(CORE) <= set(graph)
    for start in CORE:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(graph.get(m, ()))
        reached = sorted(m for m in seen if m == "vfcore.distributed" or m.startswith("vfcore.distributed."))
        assert reached == [], f"{start} reaches {reached}"


def test_dissect_does_not_import_analysis_but_analysis_imports_dissect():
    graph = _graph()
    into_analysis = [(m, t) for m, ts in graph.items() if _room(m) == "vfcore.dissect"
                     for t in ts if _room(t) == "vfcore.analysis"]
    assert into_analysis == []
    assert any(_room(t) == "vfcore.dissect" for m, ts in graph.items() if _room(m) == "vfcore.analysis" for t in ts)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_over_600_lines(name):
    n = len(MODULES[name].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[name]} has {n} lines"


def test_only_the_run_module_spells_run_folder_paths_and_notebooks():
    spelled = {}
    for path in MODULES.values():
        if path == PACKAGE / "run.py":
            continue
        hits = [s for s in OWNED_BY_RUN if s in path.read_text()]
        if hits:
            spelled[str(path.relative_to(PACKAGE.parent))] = hits
    assert spelled == {}
