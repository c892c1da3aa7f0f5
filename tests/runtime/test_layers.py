"""The layers hold: `retrv.runtime` imports nothing from the packages beside or above it.

Checked on the source, not on `sys.modules` after an import: every `import`, `from ... import`, and every string
that names a module (what `importlib.import_module`, `require` or a lazy table would import) in every module of
runtime/, at any depth (inside functions too: a lazy upward import is still an upward import).

    config (runtime/config.py) -> runtime -> app (cli, commands, demo)
    model, export, calibration, kernels, train: beside the runtime; they may import it, never the reverse
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ROOT / "runtime"
FORBIDDEN = ("retrv.export", "retrv.model", "retrv.calibration", "retrv.train", "retrv.app", "retrv.kernels")
HEAVY = ("torch", "transformers", "tensorrt", "triton", "onnx")  # onnx (the package), not onnxruntime
# (module, what it may import lazily, inside a function, and why)
ALLOWED_LAZY = {
    ("backends/trt.py", "retrv.kernels.trt_plugin"): "the TensorRT plugin is registered when an engine is loaded",
    ("backends/trt.py", "tensorrt"): "TensorRT itself, only when the TensorRT backend runs",
}
_MODULE_RE = re.compile(r"retrv(\.[A-Za-z_][A-Za-z0-9_]*)+")
_IMPORTERS = {"import_module", "__import__", "require"}


def _call_name(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def imports_of(path: Path) -> list[tuple[str, bool, int]]:
    """(module, inside a function, line) for every import and module-naming string in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _docstrings(tree)
    out = []

    def visit(node: ast.AST, in_func: bool) -> None:
        for child in ast.iter_child_nodes(node):
            f = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, f, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                out.append((child.module, f, child.lineno))
                out.extend((f"{child.module}.{a.name}", f, child.lineno) for a in child.names)
            elif isinstance(child, ast.Call) and _call_name(child) in _IMPORTERS and child.args \
                    and isinstance(child.args[0], ast.Constant) and isinstance(child.args[0].value, str):
                out.append((child.args[0].value, f, child.lineno))  # importlib.import_module("torch"), require(...)
            elif isinstance(child, ast.Constant) and isinstance(child.value, str) and id(child) not in skip \
                    and _MODULE_RE.fullmatch(child.value):
                out.append((child.value, f, child.lineno))  # "retrv.x.y" in a lazy table
            visit(child, f)

    visit(tree, False)
    return out


def _bad(path: Path, rel: str | None = None) -> list[str]:
    rel = rel or path.relative_to(RUNTIME).as_posix()
    problems = []
    for mod, lazy, line in imports_of(path):
        top = mod.split(".")[0]
        hits_layer = any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN)
        if not hits_layer and top not in HEAVY:
            continue
        allowed = any(rel == r and (mod == m or mod.startswith(m + ".")) and lazy for r, m in ALLOWED_LAZY)
        if not allowed:
            problems.append(f"runtime/{rel}:{line} imports {mod}")
    return problems


def test_runtime_imports_nothing_from_beside_or_above():
    problems = [p for path in sorted(RUNTIME.rglob("*.py")) for p in _bad(path)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("source, expected", [
    ("from retrv.model.config import ModelConfig", True),
    ("def f():\n    from retrv.export.pack_export import export_pack", True),  # lazy is still upward
    ("import importlib\nimportlib.import_module('retrv.train.synth')", True),  # a string import
    ("LAZY = {'X': 'retrv.app.cli'}", True),
    ("import torch", True),
    ("from retrv.runtime.errors import require\nrequire('torch', 'export')", True),
    ("BACKENDS = ('auto', 'ort', 'torch')", False),  # a name, not an import
    ("from retrv.runtime.errors import RetrvError", False),
    ("'''See retrv.model.config.'''", False),  # a docstring names, it does not import
    ("raise ValueError('load retrv.export.torch_backend first')", False),
])
def test_the_check_itself_can_fail(tmp_path, source, expected):
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert bool(_bad(path, rel="probe.py")) is expected
