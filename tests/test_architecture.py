"""The package layering: every import of one rlx package by another points down the stack.

    top (cli, demo)  ->  serve  ->  api  ->  report  ->  compiler  ->  runtime  ->  frontends  ->  hir  ->  base
                                          compiler  ->  targets  ->  hir
                                          compiler  ->  passes   ->  hir
                             api  ->  gemma  ->  compiler   (`rlx.gemma`, the rlx-gemma crate's builder API)

`base` is errors / progress / outputs / version / interrupts / digests. Every import counts,
lazy ones inside functions and TYPE_CHECKING ones too: a lazy import is still a dependency, only
a hidden one. The test prints the package graph it found (`pytest -s tests/test_architecture.py`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

RLX = Path(__file__).resolve().parents[1] / "rlx"

LAYER_OF_TOP_MODULE = {"errors": "base", "progress": "base", "outputs": "base", "version": "base",
                       "interrupts": "base", "digests": "base",
                       "gemma": "gemma", "api": "api", "cli": "top", "demo": "top", "__init__": "top", "__main__": "top"}
ALLOWED: dict[str, set[str]] = {
    "base": set(),
    "hir": {"base"},
    "frontends": {"base", "hir"},
    "passes": {"base", "hir"},
    "targets": {"base", "hir"},
    "runtime": {"base", "hir", "frontends"},
    "compiler": {"base", "hir", "frontends", "passes", "targets", "runtime"},
    "report": {"base", "hir", "frontends", "passes", "targets", "runtime", "compiler"},
    "gemma": {"base", "hir", "frontends", "passes", "targets", "runtime", "compiler"},
    "api": {"base", "hir", "frontends", "passes", "targets", "runtime", "compiler", "report", "gemma"},
    "serve": {"base", "hir", "frontends", "passes", "targets", "runtime", "compiler", "report", "api", "gemma"},
    "top": {"base", "hir", "frontends", "passes", "targets", "runtime", "compiler", "report", "api", "serve",
            "gemma"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(RLX.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "top"
    if len(parts) == 2 and parts[1] in LAYER_OF_TOP_MODULE and not (RLX / parts[1]).is_dir():
        return LAYER_OF_TOP_MODULE[parts[1]]
    return parts[1]


def _imports(path: Path) -> set[str]:
    """Every rlx module `path` imports, wherever the import statement is."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("rlx"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlx") and node.level == 0:
            out.add(node.module)
    return out


def module_graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for path in RLX.rglob("*.py"):
        name = _module_name(path)
        g.add_node(name)
        for target in _imports(path):
            if target != name:
                g.add_edge(name, target)
    return g


def package_graph(modules: nx.DiGraph) -> nx.DiGraph:
    g = nx.DiGraph()
    for a, b in modules.edges:
        la, lb = _layer(a), _layer(b)
        if la != lb:
            g.add_edge(la, lb)
    return g


def test_every_import_points_down_the_stack() -> None:
    modules = module_graph()
    packages = package_graph(modules)
    print("\npackage graph (importer -> imported):")
    for src in sorted(packages):
        print(f"  {src:<10} -> {', '.join(sorted(packages.successors(src))) or '-'}")
    assert set(ALLOWED) >= set(packages), f"unknown packages {set(packages) - set(ALLOWED)}: add them to ALLOWED"
    wrong = sorted(f"{a} ({_layer(a)}) imports {b} ({_layer(b)})" for a, b in modules.edges
                   if _layer(a) != _layer(b) and _layer(b) not in ALLOWED[_layer(a)])
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)
    assert nx.is_directed_acyclic_graph(packages), list(nx.simple_cycles(packages))


def test_no_module_import_cycles() -> None:
    cycles = [sorted(c) for c in nx.strongly_connected_components(module_graph()) if len(c) > 1]
    assert not cycles, f"modules importing each other: {cycles}"


def test_the_layering_itself_is_a_dag() -> None:
    allowed = nx.DiGraph([(a, b) for a, bs in ALLOWED.items() for b in bs])
    assert nx.is_directed_acyclic_graph(allowed)
