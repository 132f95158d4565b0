"""Every user-facing error carries its fix: each `RlxError` (or subclass) rlx constructs passes a
`hint=` (the CLI prints it as the `fix:` line). Checked on the source, so an error path no test
reaches is covered too."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import rlx.errors

RLX = Path(__file__).resolve().parents[1] / "rlx"


def _error_classes() -> set[str]:
    """Names of RlxError and every subclass defined anywhere in rlx (found by their base names)."""
    names = {n for n, c in inspect.getmembers(rlx.errors, inspect.isclass) if issubclass(c, rlx.errors.RlxError)}
    trees = [ast.parse(p.read_text()) for p in RLX.rglob("*.py")]
    grew = True
    while grew:
        grew = False
        for tree in trees:
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef) and node.name not in names and any(
                        isinstance(b, ast.Name) and b.id in names for b in node.bases):
                    names.add(node.name)
                    grew = True
    return names


def test_every_rlx_error_has_a_fix() -> None:
    classes = _error_classes()
    missing = []
    for path in sorted(RLX.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in classes:
                if not any(k.arg == "hint" or k.arg is None for k in node.keywords):
                    missing.append(f"{path.relative_to(RLX.parent)}:{node.lineno}: {node.func.id}(...) without hint=")
    assert not missing, "errors without a fix:\n" + "\n".join(missing)
