"""The embedded corpus: the running Python's standard library, so that herd runs offline.

- ``stdlib:prose``: per module, the docstrings of the module, its classes and its functions,
  read with :mod:`ast` (nothing is imported), each headed by the qualified name and signature.
- ``stdlib:code``: per module, the ``.py`` source.

Both skip site-packages, the test suites (``test/``, ``tests/``, ``idlelib/idle_test``) and files
that resolve outside the Python install; modules are taken in sorted path order. The other
embedded sets (sft, preferences, passkey) are built from the same files.
"""

from __future__ import annotations

import ast
import io
import logging
import os
import sysconfig
import tokenize
from collections.abc import Iterator
from pathlib import Path

from herd.data.inputs import Document

logger = logging.getLogger(__name__)

STDLIB_PROSE = "stdlib:prose"
STDLIB_CODE = "stdlib:code"
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def stdlib_dir() -> Path:
    """The running Python's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The stdlib's ``.py`` files in sorted order, without tests, site-packages or outside links."""
    root = (root or stdlib_dir()).resolve()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS and not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath, name)
            if name.endswith(".py") and path.resolve().is_relative_to(root):
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def stdlib_code(root: Path | None = None) -> Iterator[Document]:
    """One document per stdlib module: its source text."""
    root = (root or stdlib_dir()).resolve()
    for path in stdlib_files(root):
        yield Document(path.relative_to(root).as_posix(), _read_source(path))


def stdlib_prose(root: Path | None = None) -> Iterator[Document]:
    """One document per stdlib module: its docstrings (empty when it has none)."""
    root = (root or stdlib_dir()).resolve()
    for path in stdlib_files(root):
        relative = path.relative_to(root).as_posix()
        yield Document(relative, module_docstrings(path.read_bytes(), module_name(relative)))


def module_docstrings(source: bytes | str, module: str) -> str:
    """The docstrings of a module and of its classes and functions, as one text.

    Each docstring is headed by the qualified name (and signature for functions); entries
    without a docstring are left out, so a module without any gives ``""``.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError) as err:
        logger.warning("skipping docstrings of %s: it does not parse (%s)", module, err)
        return ""
    sections = []
    if doc := ast.get_docstring(tree):
        sections.append(f"Module {module}\n\n{doc}")
    sections += [f"{header}\n\n{doc}" for header, doc in _definitions(tree.body, module)]
    return "\n\n\n".join(sections)


def _definitions(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, str]]:
    """(header, docstring) of the classes and functions in ``body``, in source order."""
    for node in body:
        if isinstance(node, ast.ClassDef):
            name = f"{prefix}.{node.name}"
            bases = ", ".join(ast.unparse(base) for base in node.bases)
            if doc := ast.get_docstring(node):
                yield f"class {name}({bases})" if bases else f"class {name}", doc
            yield from _definitions(node.body, name)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if doc := ast.get_docstring(node):
                kind = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
                yield f"{kind} {prefix}.{node.name}({ast.unparse(node.args)})", doc
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            yield from _definitions(nested_statements(node), prefix)


def nested_statements(node: ast.If | ast.Try | ast.With) -> list[ast.stmt]:
    """Statements inside an if/try/with block, in source order (definitions often hide there)."""
    statements = list(node.body)
    for handler in getattr(node, "handlers", []):
        statements += handler.body
    return statements + list(getattr(node, "orelse", [])) + list(getattr(node, "finalbody", []))


def module_name(relative: str) -> str:
    """The dotted module name of a path relative to the stdlib folder (``email/mime/text.py``)."""
    parts = relative.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _read_source(path: Path) -> str:
    """A Python file's text, decoded by its coding cookie (utf-8 by default)."""
    data = path.read_bytes()
    encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    return data.decode(encoding, errors="replace")
