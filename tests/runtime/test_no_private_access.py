"""No module of `retrv.runtime` reaches into another's private names.

Checked on the source of every module under runtime/, at any depth:

(a) `from X import _name`: a private name imported from another module;
(b) `obj._name` read where `obj` is not `self`, `cls`, `super()` or a name defined at the top of the same module
    (its own private class or function): another object's private state;
(c) `obj._name = ...` (or `del`, `+=`) on such an object: another object's private state written.

Dunder names (`__init__`, `__class__`, ...) are public protocol and allowed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ROOT / "runtime"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_names(tree: ast.Module) -> set[str]:
    """Names the module defines at its top level (not the ones it imports)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def _own(obj: ast.expr, local: set[str]) -> bool:
    if isinstance(obj, ast.Name):
        return obj.id in ("self", "cls") or obj.id in local
    if isinstance(obj, ast.Call) and isinstance(obj.func, ast.Name) and obj.func.id == "super":
        return True
    return False


def violations(source: str, where: str = "<src>") -> list[str]:
    """Every private-name access across modules or objects in `source`, as 'where:line: what'."""
    tree = ast.parse(source, where)
    local = _module_names(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for a in node.names:
                if _private(a.name):
                    out.append(f"{where}:{node.lineno}: imports private {a.name} from {'.' * node.level}"
                               f"{node.module or ''}")
        elif isinstance(node, ast.Attribute) and _private(node.attr) and not _own(node.value, local):
            verb = "reads" if isinstance(node.ctx, ast.Load) else "writes"
            out.append(f"{where}:{node.lineno}: {verb} {ast.unparse(node)} (another object's private name)")
    return out


def runtime_modules() -> list[Path]:
    return sorted(RUNTIME.rglob("*.py"))


def test_runtime_has_modules_to_check():
    assert len(runtime_modules()) > 20


def test_no_module_reaches_into_another_modules_private_names():
    found = []
    for path in runtime_modules():
        found += violations(path.read_text(), str(path.relative_to(ROOT)))
    assert not found, "private names used across modules or objects:\n" + "\n".join(found)


@pytest.mark.parametrize("src, bad", [
    ("from retrv.runtime.index.token_cache import _layout\n", True),
    ("from .answer import _Node\n", True),
    ("from retrv.runtime.index.token_cache import layout, __version__\n", False),
    ("def f(rr):\n    return rr._force()\n", True),
    ("def f(w):\n    w._text = []\n", True),
    ("def f(w):\n    w._n += 1\n", True),
    ("import numpy as np\nx = np._core\n", True),
    ("def f(a, b):\n    return a.x._y\n", True),
    ("class A:\n    def f(self):\n        return self._x + type(self).__name__\n", False),
    ("class A:\n    @classmethod\n    def f(cls):\n        return cls._x\n", False),
    ("class A:\n    def f(self):\n        return super()._g()\n", False),
    ("class _N:\n    _slots = 1\n\ndef f():\n    return _N._slots\n", False),
    ("def f(x):\n    return x.__class__, x.public\n", False),
])
def test_the_check_itself_can_fail(src, bad):
    assert bool(violations(src)) is bad, violations(src)
