"""The package's import graph has no cycle, counting every import statement.

Each module of ``src/tinygpt`` is parsed (not imported), and every ``import`` / ``from ... import``
in it counts: at the top level, inside functions, under ``if TYPE_CHECKING:``. Relative imports
are resolved, ``from tinygpt.x import y`` counts as importing ``tinygpt.x.y`` when ``y`` is a
submodule, and importing ``tinygpt.a.b`` also imports the package ``tinygpt.a`` (its
``__init__``) -- so a module that imports its own package's ``__init__`` closes a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "tinygpt"


def module_files(src: Path = SRC, package: str = PACKAGE) -> dict[str, Path]:
    """Module name -> file, for every module of the package (a package is its ``__init__``)."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _parents(name: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``: the packages whose ``__init__`` runs before ``a.b.c``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that module ``name`` imports anywhere in its source.

    Importing ``a.b.c`` runs the ``__init__`` of ``a`` and ``a.b`` first; those count too,
    except the packages that hold ``name`` itself (they are already running when it runs) --
    but a module that imports names from its own package's ``__init__`` depends on it.
    """
    is_package = path.name == "__init__.py"
    running = set(_parents(name))
    found: set[str] = set()

    def add(target: str, explicit: bool = True) -> None:
        if explicit:
            found.add(target)
        found.update(p for p in _parents(target) if p not in running)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # ``from pkg import sub`` imports the submodule pkg.sub; other names are read from
            # pkg itself.
            subs = [f"{origin}.{a.name}" for a in node.names if f"{origin}.{a.name}" in modules]
            for sub in subs:
                add(sub)
            add(origin, explicit=len(subs) < len(node.names))
    found.discard(name)
    return {m for m in found if m in modules}


def import_graph(src: Path = SRC, package: str = PACKAGE) -> dict[str, set[str]]:
    modules = module_files(src, package)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes, the first repeated at the end; None if none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_imports_have_no_cycle():
    graph = import_graph()
    assert len(graph) > 20 and "tinygpt.models.gpt" in graph  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_models_import_nothing_from_the_rest_of_the_package():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("tinygpt.models"):
            outside = {d for d in deps if d != PACKAGE and not d.startswith("tinygpt.models")}
            assert not outside, f"{name} imports {sorted(outside)}: models/ is the leaf"


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.mark.parametrize("files, expected", [
    # An import under TYPE_CHECKING closes the circle as well as a top-level one.
    ({"tinygpt/__init__.py": "", "tinygpt/a.py": "from tinygpt import b\n",
      "tinygpt/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tinygpt.a import X\n"},
     ["tinygpt.a", "tinygpt.b", "tinygpt.a"]),
    # A deferred relative import inside a function; a module importing its package's __init__.
    ({"tinygpt/__init__.py": "", "tinygpt/p/__init__.py": "from .q import f\n",
      "tinygpt/p/q.py": "def f():\n    from . import r\n", "tinygpt/p/r.py": "import tinygpt.p\n"},
     ["tinygpt.p", "tinygpt.p.q", "tinygpt.p.r", "tinygpt.p"]),
    ({"tinygpt/__init__.py": "", "tinygpt/a.py": "import tinygpt.b\n", "tinygpt/b.py": "import os\n"},
     None),
])
def test_the_cycle_finder_sees_every_kind_of_import(tmp_path, files, expected):
    graph = import_graph(_write(tmp_path, files))
    assert find_cycle(graph) == expected
