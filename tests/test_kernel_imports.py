"""The import graph of ``arkfast/kernels``: no cycle between its modules, and nothing imported from
outside it but torch, triton and the standard library, so the package works on its own. Every import
statement counts, also those inside functions and under ``if TYPE_CHECKING:``."""
import ast
import sys
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "arkfast" / "kernels"
PACKAGE = "arkfast.kernels"
ALLOWED = {"torch", "triton", "__future__"} | set(sys.stdlib_module_names)
# hf_patch patches a loaded transformers model; it imports transformers inside the function that
# needs a transformers type, which only runs on such a model.
ALLOWED_IN = {"hf_patch": {"transformers"}}


def import_graph(folder: Path, package: str) -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """``({module: modules of the package it imports}, [(module, outside module)])`` for the ``.py``
    files of ``folder`` (the package ``package``; ``__init__`` is the package itself)."""
    modules = {p.stem for p in folder.glob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    outside: list[tuple[str, str]] = []

    def target(module: str, name: str) -> None:
        if name == package or name.startswith(package + "."):
            rest = name[len(package) + 1:].split(".")[0] if name != package else "__init__"
            edges[module].add(rest if rest in modules else "__init__")
        else:
            outside.append((module, name))

    for path in sorted(folder.glob("*.py")):
        module = path.stem
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target(module, alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    target(module, node.module)
                    continue
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                if node.module:
                    target(module, f"{base}.{node.module}")
                else:  # from . import a, b: each a submodule, or a name of the package's __init__
                    for alias in node.names:
                        target(module, f"{base}.{alias.name}")
    return edges, outside


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules (first == last), or None."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_kernels_import_graph_is_acyclic():
    edges, _ = import_graph(KERNELS, PACKAGE)
    assert {"decode_attention", "cascade_attention", "work_list"} <= set(edges)
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)
    # Plain and cascade decode share their types through work_list, not through each other.
    assert "decode_attention" not in edges["cascade_attention"]
    assert "work_list" in edges["cascade_attention"] and "work_list" in edges["decode_attention"]


def test_kernels_import_nothing_else_of_arkfast_or_beyond():
    _, outside = import_graph(KERNELS, PACKAGE)
    bad = [(m, name) for m, name in outside
           if name.split(".")[0] not in ALLOWED | ALLOWED_IN.get(m, set())]
    assert not bad, bad


def test_the_checks_see_cycles_and_outside_imports(tmp_path):
    """The graph builder on a package made to fail: a cycle closed only by a TYPE_CHECKING import, a
    function-local import of the rest of arkfast, and an absolute import of the package itself."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("from .b import g\n\ndef f():\n    from arkfast.engine import planner\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n"
                              "def g():\n    pass\n")
    (pkg / "c.py").write_text("import pkg.b\nfrom . import a\nfrom . import f\n")
    edges, outside = import_graph(pkg, "pkg")
    assert edges == {"__init__": {"a"}, "a": {"b"}, "b": {"a"}, "c": {"a", "b", "__init__"}}
    assert find_cycle(edges) == ["a", "b", "a"]
    assert ("a", "arkfast.engine") in outside and ("b", "typing") in outside
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": set()}) is None
