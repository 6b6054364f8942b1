"""The shape of the code: import layers, no circles, no private names across modules.

The layers are the import-linter contract in pyproject.toml (highest first: entry points, the
library modules they share, callbacks, stages, evaluation, interop, data, model, then paths and
logs). A module may import from its own layer or below; entry points never import one another.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "herd"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(src_parent: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(src_parent), "HOME": str(src_parent)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", str(ROOT / "pyproject.toml")], cwd=src_parent,
                          env=env, capture_output=True, text=True, timeout=300)


def test_every_module_imports_only_from_its_layer_or_below():
    result = _lint_imports(SRC.parent)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Contracts: 1 kept, 0 broken." in result.stdout


@pytest.mark.slow
def test_the_layer_check_fails_on_an_upward_import(tmp_path):
    """A copy of the package in which the model layer imports an entry point breaks the contract."""
    shutil.copytree(SRC, tmp_path / "herd", ignore=shutil.ignore_patterns("__pycache__"))
    rope = tmp_path / "herd" / "model" / "rope.py"
    rope.write_text(rope.read_text() + "\n\ndef _upward():\n    import herd.train  # noqa: F401\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "herd.model is not allowed to import herd.train" in result.stdout


def _import_graph() -> grimp.ImportGraph:
    return grimp.build_graph("herd", exclude_type_checking_imports=True)


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.find_modules_directly_imported_by(node):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_circles():
    """Lazy (function-level) imports count too: a circle is a circle wherever the import sits."""
    assert _cycles(_import_graph()) == []


def test_the_circle_check_finds_a_planted_circle():
    graph = _import_graph()
    graph.add_import(importer="herd.model.rope", imported="herd.model.transformer")
    assert any({"herd.model.rope", "herd.model.transformer"} <= set(cycle) for cycle in _cycles(graph))


def _private_imports(path: Path, root: Path = SRC) -> list[str]:
    """``from herd.x import _name`` and ``module._name`` on an imported herd module, outside ``herd.x`` itself."""
    module = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
    tree = ast.parse(path.read_text(), str(path))
    found, herd_aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("herd"):
            for alias in node.names:
                if alias.name.startswith("_") and node.module != module:
                    found.append(f"{module}:{node.lineno} imports {node.module}.{alias.name}")
                elif node.module != module:
                    herd_aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("herd") and alias.asname:
                    herd_aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in herd_aliases):
            found.append(f"{module}:{node.lineno} uses {herd_aliases[node.value.id]}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    found = [hit for path in sorted(SRC.rglob("*.py")) for hit in _private_imports(path)]
    assert found == []


def test_the_private_name_check_finds_both_forms(tmp_path):
    package = tmp_path / "herd" / "model"
    package.mkdir(parents=True)
    (package / "rope.py").write_text("from herd.model.transformer import _helper\n"
                                     "from herd.model import attention\n\nattention._mask()\n")
    found = _private_imports(package / "rope.py", root=tmp_path / "herd")
    assert found == ["herd.model.rope:1 imports herd.model.transformer._helper",
                     "herd.model.rope:4 uses herd.model.attention._mask"]
