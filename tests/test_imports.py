"""The package's modules, and its parts, depend on each other in one direction only.

Every `import` in qtarget_jax/**/*.py is read with `ast` (at module top AND inside functions,
where an import can hide a cycle until it runs). Two graphs must have no cycle; a cycle is
named with the file:line of each import on it:
- modules: each .py file is a node (a package's __init__.py is the package); `from a import b`
  is an edge to module a.b when that is a module, else to a;
- parts: each import mapped to the part it belongs to, a subpackage (train, evaluate, models,
  targets, data, problems) or a top-level module (config, checkpoint, generate, lens). A part's
  `__main__.py` is skipped there: it is the program run by `python -m`, after its package is
  imported, and nothing imports it, so its imports (the chat CLI loads run folders through
  `evaluate`) cannot close a cycle of parts.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "qtarget_jax"


def _module_name(root: pathlib.Path, path: pathlib.Path) -> tuple[str, bool]:
    """(dotted module name, is a package __init__) of `path` under the package `root`."""
    parts = (root.name,) + path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _imported(node: ast.AST, module: str, is_init: bool) -> list[str]:
    """Dotted names an Import / ImportFrom node may load (`from a import b`: a.b and a)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".")
        base = base[:len(base) - node.level + (1 if is_init else 0)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]


def _part(root: pathlib.Path, dotted: str) -> str | None:
    """The part of the package `dotted` belongs to (its first name below the package), None
    for names outside the package and for the package root itself."""
    names = dotted.split(".")
    if names[0] != root.name or len(names) < 2:
        return None
    first = names[1]
    if (root / first).is_dir() or (root / f"{first}.py").is_file():
        return first
    return None                       # `from qtarget_jax import __version__`: the root


def part_edges(root: pathlib.Path) -> dict[tuple[str, str], list[str]]:
    """{(importing part, imported part): ["file:line", ...]} over every import in `root`."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        if path.name == "__main__.py":      # an entry point: imported by nothing
            continue
        module, is_init = _module_name(root, path)
        source = _part(root, module)
        if source is None:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            targets = {_part(root, name) for name in _imported(node, module, is_init)}
            for target in sorted(t for t in targets if t is not None and t != source):
                where = f"{path.relative_to(root.parent)}:{node.lineno}"
                edges.setdefault((source, target), []).append(where)
    return edges


def _modules(root: pathlib.Path) -> dict[str, tuple[pathlib.Path, bool]]:
    """{dotted module name: (path, is a package __init__)} of every .py file under `root`."""
    return {name: (path, is_init) for path in sorted(root.rglob("*.py"))
            for name, is_init in [_module_name(root, path)]}


def module_edges(root: pathlib.Path) -> dict[tuple[str, str], list[str]]:
    """{(importing module, imported module): ["file:line", ...]} over every import in `root`,
    both ends modules of the package (`from a import b`: a.b when a module, else a)."""
    modules = _modules(root)
    edges: dict[tuple[str, str], list[str]] = {}
    for module, (path, is_init) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            names = _imported(node, module, is_init)
            if isinstance(node, ast.ImportFrom):   # [prefix.x, ..., prefix]: a.b, else a
                names = [n if n in modules else names[-1] for n in names[:-1]]
            for name in sorted(set(names)):
                while name and name not in modules:  # `import a.b.c`: the module a.b.c
                    name = name.rpartition(".")[0]
                if name and name != module:
                    edges.setdefault((module, name), []).append(
                        f"{path.relative_to(root.parent)}:{node.lineno}")
    return edges


def find_cycle(edges: dict[tuple[str, str], list[str]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of the directed graph `edges`, or None."""
    graph: dict[str, list[str]] = {}
    for a, b in sorted(edges):
        graph.setdefault(a, []).append(b)
    state: dict[str, int] = {}        # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def describe(cycle: list[str], edges: dict[tuple[str, str], list[str]]) -> str:
    """'a -> b -> a' and, per step, the imports that make it."""
    lines = [" -> ".join(cycle)]
    for a, b in zip(cycle, cycle[1:]):
        lines.append(f"  {a} -> {b}: {', '.join(edges[(a, b)])}")
    return "\n".join(lines)


def test_parts_of_the_package_import_each_other_without_a_cycle():
    edges = part_edges(PACKAGE)
    # The reader sees the package: these dependencies exist (guards against a vacuous pass).
    for edge in [("train", "models"), ("train", "targets"), ("evaluate", "train"),
                 ("train", "problems"), ("evaluate", "problems")]:
        assert edge in edges, f"expected an import {edge[0]} -> {edge[1]}; found {sorted(edges)}"
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle between parts of qtarget_jax:\n" + describe(cycle, edges)


def test_modules_of_the_package_import_each_other_without_a_cycle():
    edges = module_edges(PACKAGE)
    for edge in [("qtarget_jax.models.decoder", "qtarget_jax.models.layers"),
                 ("qtarget_jax.models.loading", "qtarget_jax.models.convert"),
                 ("qtarget_jax.train.step", "qtarget_jax.targets")]:   # a function-level one
        assert edge in edges, f"expected an import {edge[0]} -> {edge[1]}; found {sorted(edges)}"
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle between modules of qtarget_jax:\n" + describe(cycle,
                                                                                      edges)


# The two cycles the models package once had, in miniature: one closed by a function-level
# import inside one module pair, one through three modules of the same subpackage.
OLD_CYCLES = [
    ({"__init__.py": "", "models/__init__.py": "",
      "models/convert.py": "def main():\n    from pkg.models.loading import cached\n",
      "models/loading.py": "def cached():\n    from pkg.models.convert import main\n"},
     ["pkg.models.convert", "pkg.models.loading", "pkg.models.convert"]),
    ({"__init__.py": "", "models/__init__.py": "from pkg.models.decoder import Decoder\n",
      "models/decoder.py": "from pkg.models.layers import Block\nDecoder = Block\n",
      "models/layers.py": "from .lora import adapt\nBlock = adapt\n",
      "models/lora.py": "def adapt():\n    from pkg.models import decoder\n"},
     ["pkg.models.decoder", "pkg.models.layers", "pkg.models.lora", "pkg.models.decoder"]),
]


@pytest.mark.parametrize("files,cycle", OLD_CYCLES)
def test_a_cycle_inside_one_subpackage_is_found(tmp_path, files, cycle):
    _write(tmp_path / "pkg", files)
    assert find_cycle(part_edges(tmp_path / "pkg")) is None   # one part: the coarse graph is blind
    assert find_cycle(module_edges(tmp_path / "pkg")) == cycle


def test_a_package_init_is_a_module_and_from_import_names_the_submodule(tmp_path):
    _write(tmp_path / "pkg", {
        "__init__.py": "", "m/__init__.py": "from pkg.m.a import f\n",
        "m/a.py": "import os\nfrom pkg.m import b\n\ndef f():\n    from . import c\n",
        "m/b.py": "from pkg.m.c import g\n", "m/c.py": "import pkg.m.b as bb\ng = 1\n"})
    edges = module_edges(tmp_path / "pkg")
    assert edges == {("pkg.m", "pkg.m.a"): ["pkg/m/__init__.py:1"],
                     ("pkg.m.a", "pkg.m.b"): ["pkg/m/a.py:2"],
                     ("pkg.m.a", "pkg.m.c"): ["pkg/m/a.py:5"],
                     ("pkg.m.b", "pkg.m.c"): ["pkg/m/b.py:1"],
                     ("pkg.m.c", "pkg.m.b"): ["pkg/m/c.py:1"]}
    assert find_cycle(edges) == ["pkg.m.b", "pkg.m.c", "pkg.m.b"]


def test_train_and_evaluate_meet_in_one_direction():
    """evaluate reads the checkpoint layout and the loss from train; train never imports
    evaluate (the in-training problem accuracy comes from `problems`)."""
    edges = part_edges(PACKAGE)
    assert ("train", "evaluate") not in edges, edges.get(("train", "evaluate"))


def _write(root: pathlib.Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_a_cycle_hidden_in_a_function_is_found_and_named(tmp_path):
    root = tmp_path / "pkg"
    _write(root, {
        "__init__.py": "",
        "a/__init__.py": "from pkg.a.core import f\n",
        "a/core.py": "import os\n\ndef f():\n    from pkg.b.run import g\n    return g\n",
        "b/__init__.py": "",
        "b/run.py": "from ..a import core\n\ndef g():\n    return core\n",
        "c.py": "from pkg import b\n",
    })
    edges = part_edges(root)
    assert edges == {("a", "b"): ["pkg/a/core.py:4"], ("b", "a"): ["pkg/b/run.py:1"],
                     ("c", "b"): ["pkg/c.py:1"]}
    cycle = find_cycle(edges)
    assert cycle == ["a", "b", "a"]
    assert describe(cycle, edges) == ("a -> b -> a\n  a -> b: pkg/a/core.py:4\n"
                                      "  b -> a: pkg/b/run.py:1")


@pytest.mark.parametrize("files", [
    {"__init__.py": "", "a.py": "import pkg.b\n", "b.py": "import os\n"},
    {"__init__.py": "from pkg import a, b\n", "a.py": "from . import b\n", "b.py": ""},
])
def test_one_way_imports_are_no_cycle(tmp_path, files):
    _write(tmp_path / "pkg", files)
    edges = part_edges(tmp_path / "pkg")
    assert edges == {("a", "b"): [edges[("a", "b")][0]]}
    assert find_cycle(edges) is None
