"""Documents for herd.prepare: the embedded stdlib corpus, text files, folders and jsonl.

Every source yields :class:`Document` objects in a deterministic order. A document's ``id`` is
stable across machines (paths are relative), so hashing it assigns the same documents to the
validation split everywhere.

The embedded corpus comes from the running Python's standard library, so herd runs offline:

- ``stdlib:prose``: per module, the docstrings of the module, its classes and its functions,
  read with :mod:`ast` (nothing is imported), each headed by the qualified name and signature.
- ``stdlib:code``: per module, the ``.py`` source.
- ``stdlib:passkey``: synthetic long-context retrieval documents: a window of stdlib prose or
  code with a pass key hidden at a random depth, asked for at the end (the needle-in-a-haystack
  format), 100 to 7K characters of haystack with as many tokens at every length scale. For
  long-context training of small models. Options go in a query string:
  ``stdlib:passkey?min_chars=2500&max_chars=7000&documents=4000&seed=1``.

Both skip site-packages, the test suites (``test/``, ``tests/``, ``idlelib/idle_test``) and files
that resolve outside the Python install; modules are taken in sorted path order.

(``stdlib:sft``, questions about the stdlib's functions answered by their docs, is a dialog input:
see ``herd.data.sft`` and ``herd.data.dialogs``, which reads jsonl through :func:`jsonl_records`.)

Files and jsonl records are checked to be text: a file that is not UTF-8, a jsonl line that is
not a JSON object with a string in ``text_field``, and any text holding a NUL character or more
than :data:`MAX_CONTROL_SHARE` of control characters (other than tab, newlines, form feed and
vertical tab) is a :class:`BadInputError`, whose ``reason`` is one of :data:`BAD_INPUT_REASONS`.
By default it is raised; pass ``on_bad_input`` to :func:`iter_documents` to skip it instead.
"""

from __future__ import annotations

import ast
import io
import json
import logging
import os
import re
import sysconfig
import tokenize
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STDLIB_PROSE = "stdlib:prose"
STDLIB_CODE = "stdlib:code"
STDLIB_PASSKEY = "stdlib:passkey"
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
_JSONL_SUFFIXES = (".jsonl", ".ndjson")

# Why an input is not usable text (BadInputError.reason).
BAD_INPUT_REASONS = ("not_utf8", "binary", "malformed_json", "not_an_object", "missing_field", "not_a_string")
# A text with a larger share of control characters (see _CONTROL) is taken for binary data.
MAX_CONTROL_SHARE = 0.05
# Unicode category Cc, less the whitespace of ordinary text: \t \n \v \f \r.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class Document:
    """One document: a stable id (used to assign the split) and its text."""

    id: str
    text: str


class BadInputError(ValueError):
    """A file or jsonl line that is not usable text; the message names it and the fix.

    ``reason`` is one of :data:`BAD_INPUT_REASONS`; ``location`` is the file, or ``file:line``.
    """

    def __init__(self, message: str, reason: str, location: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.location = location


# Called with each bad input: raise to stop reading, return to skip the input.
OnBadInput = Callable[[BadInputError], None]


def raise_bad_input(error: BadInputError) -> None:
    """The default :data:`OnBadInput`: stop at the first bad input."""
    raise error


def iter_documents(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    text_field: str = "text",
    glob: str = "**/*",
    on_bad_input: OnBadInput = raise_bad_input,
) -> Iterator[Document]:
    """Documents of one source's inputs, in order.

    Each input is ``stdlib:prose``, ``stdlib:code``, a text file (one document), a ``.jsonl``
    file (one document per line, text in ``text_field``) or a folder (every file matching
    ``glob``, sorted, each read as text or jsonl by its suffix). A file or jsonl line that is
    not text goes to ``on_bad_input`` (which raises by default); if it returns, the input is
    skipped. Missing inputs raise FileNotFoundError.
    """
    for item in [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs:
        yield from _documents_of(str(item), text_field, glob, on_bad_input)


def _documents_of(item: str, text_field: str, glob: str, on_bad_input: OnBadInput) -> Iterator[Document]:
    if item == STDLIB_PROSE:
        yield from stdlib_prose()
    elif item == STDLIB_CODE:
        yield from stdlib_code()
    elif item == STDLIB_PASSKEY or item.startswith(STDLIB_PASSKEY + "?"):
        yield from stdlib_passkey(**passkey_options(item))
    else:
        path = Path(item).expanduser()
        if path.is_dir():
            yield from folder_documents(path, text_field, glob, on_bad_input)
        elif path.is_file():
            yield from file_documents(path, path.name, text_field, on_bad_input)
        else:
            raise FileNotFoundError(
                f"input not found: {path} (neither a file nor a folder). Fix the source's input "
                f"path, or use {STDLIB_PROSE!r} / {STDLIB_CODE!r} for the embedded corpus."
            )


def folder_documents(
    folder: Path, text_field: str = "text", glob: str = "**/*", on_bad_input: OnBadInput = raise_bad_input
) -> Iterator[Document]:
    """Every non-hidden file under ``folder`` matching ``glob``, in sorted order."""
    for file in folder_files(folder, glob):
        yield from file_documents(file, file.relative_to(folder).as_posix(), text_field, on_bad_input)


def folder_files(folder: Path, glob: str = "**/*") -> list[Path]:
    """The non-hidden files under ``folder`` matching ``glob``, sorted; FileNotFoundError if none."""
    files = sorted(
        p
        for p in folder.glob(glob)
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise FileNotFoundError(f"no files match {glob!r} in {folder}; check the input folder or the glob")
    return files


def file_documents(
    path: Path, doc_id: str, text_field: str = "text", on_bad_input: OnBadInput = raise_bad_input
) -> Iterator[Document]:
    """The documents of one file: one per line for jsonl, else the whole file."""
    if path.suffix.lower() in _JSONL_SUFFIXES:
        yield from jsonl_documents(path, doc_id, text_field, on_bad_input)
        return
    try:
        text = _read_text(path)
    except BadInputError as err:
        on_bad_input(err)
        return
    yield Document(doc_id, text)


def jsonl_documents(
    path: Path,
    doc_id: str | None = None,
    text_field: str = "text",
    on_bad_input: OnBadInput = raise_bad_input,
) -> Iterator[Document]:
    """One document per non-blank line of a jsonl file; bad lines are reported as ``file:line``."""
    doc_id = doc_id or path.name
    for line_number, record in jsonl_records(path, on_bad_input, f"a {text_field!r} field"):
        where = f"{path}:{line_number}"
        try:
            text = _record_text(record, where, text_field)
        except BadInputError as err:
            on_bad_input(err)
            continue
        yield Document(f"{doc_id}:{line_number}", text)


def jsonl_records(
    path: Path, on_bad_input: OnBadInput = raise_bad_input, expected: str = "fields"
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, JSON object)`` of each non-blank line of a jsonl file.

    A line that is not UTF-8, not JSON or not a JSON object goes to ``on_bad_input`` as a
    :class:`BadInputError` located at ``file:line`` (reasons ``not_utf8``, ``malformed_json``,
    ``not_an_object``); ``expected`` says in that message what an object should hold. Every kind
    of example read from jsonl (text, dialogs) starts here.
    """
    # surrogateescape: a line that is not UTF-8 is reported alone, and the next lines still read
    with open(path, encoding="utf-8", errors="surrogateescape") as lines:
        for line_number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    record = _jsonl_object(line, f"{path}:{line_number}", expected)
                except BadInputError as err:
                    on_bad_input(err)
                    continue
                yield line_number, record


def _jsonl_object(line: str, where: str, expected: str) -> dict[str, Any]:
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as err:  # a byte that surrogateescape kept
        raise BadInputError(
            f"{where}: not UTF-8 text (invalid byte at column {err.start + 1}); convert the file to "
            "UTF-8 or remove the line", "not_utf8", where
        ) from None  # fmt: skip
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadInputError(
            f"{where}: malformed JSON ({err.msg} at column {err.colno}); fix or remove the line",
            "malformed_json", where,
        ) from None  # fmt: skip
    if not isinstance(record, dict):
        raise BadInputError(
            f"{where}: expected a JSON object with {expected}, got {type(record).__name__}; "
            "fix or remove the line", "not_an_object", where,
        )  # fmt: skip
    return record


def _record_text(record: dict[str, Any], where: str, text_field: str) -> str:
    if text_field not in record:
        raise BadInputError(
            f"{where}: no {text_field!r} field (fields: {sorted(record)}); set the source's "
            "text_field to the field that holds the text", "missing_field", where,
        )  # fmt: skip
    text = record[text_field]
    if not isinstance(text, str):
        raise BadInputError(
            f"{where}: field {text_field!r} must be a string, got {type(text).__name__}; fix or "
            "remove the line", "not_a_string", where,
        )  # fmt: skip
    check_text(text, where, f"the {text_field!r} field", "fix or remove the line")
    return text


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise BadInputError(
            f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); convert it or narrow "
            "the source's glob to text files", "not_utf8", str(path),
        ) from None  # fmt: skip
    check_text(text, str(path), "the file", "remove it or narrow the source's glob to text files")
    return text


def binary_reason(text: str) -> str | None:
    """Why ``text`` looks like binary data rather than text (None when it looks like text).

    Binary means: it holds a NUL character, or more than :data:`MAX_CONTROL_SHARE` of its
    characters are control characters other than tab, newlines, vertical tab and form feed.
    """
    if "\x00" in text:
        return "it holds NUL characters"
    controls = len(_CONTROL.findall(text))
    if controls > MAX_CONTROL_SHARE * len(text):
        return f"{controls / len(text):.0%} of its characters are control characters"
    return None


def check_text(text: str, where: str, what: str, fix: str) -> None:
    """Raise a ``binary`` :class:`BadInputError` for ``text`` that looks like binary data.

    The message reads ``{where}: {what} is not text ({why}); {fix}``.
    """
    if why := binary_reason(text):
        raise BadInputError(f"{where}: {what} is not text ({why}); {fix}", "binary", where)


# --- the embedded stdlib corpus -------------------------------------------------------------


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


def int_options(item: str, defaults: Mapping[str, int]) -> dict[str, int]:
    """The integer options of an embedded input (``stdlib:shapes?count=40&seed=1``), defaults filled in.

    ValueError names an unknown option or a value that is not an integer.
    """
    from urllib.parse import parse_qsl

    name, _, query = item.partition("?")
    options = dict(defaults)
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in defaults:
            raise ValueError(f"{item}: unknown option {key!r}; {name} takes {sorted(defaults)}")
        try:
            options[key] = int(value)
        except ValueError:
            raise ValueError(f"{item}: option {key} must be an integer, got {value!r}") from None
    return options


_PASSKEY_OPTIONS = {"documents": int, "min_chars": int, "max_chars": int, "seed": int}


def passkey_options(item: str) -> dict[str, Any]:
    """Keyword arguments of :func:`stdlib_passkey` from ``stdlib:passkey?min_chars=2500&documents=4000``."""
    from urllib.parse import parse_qsl

    _, _, query = item.partition("?")
    options: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if key not in _PASSKEY_OPTIONS:
            raise ValueError(f"input {item!r}: unknown option {key!r}; {STDLIB_PASSKEY} takes {sorted(_PASSKEY_OPTIONS)}")
        try:
            options[key] = _PASSKEY_OPTIONS[key](value)
        except ValueError:
            raise ValueError(f"input {item!r}: option {key}={value!r} must be an integer") from None
    chars = (options.pop("min_chars", 100), options.pop("max_chars", 7000))
    return {**options, "chars": chars}


def stdlib_passkey(root: Path | None = None, documents: int = 20000, chars: tuple[int, int] = (100, 7000),
                   seed: int = 0) -> Iterator[Document]:
    """Retrieval documents: a haystack with a hidden pass key, then the question that asks for it.

    ``documents`` haystacks are windows of the stdlib's prose and code (alternately) at random
    offsets, deterministic for a given stdlib, ``chars`` and ``seed`` (a larger ``documents``
    only appends). A haystack's length in characters has density proportional to
    ``1/length**2`` over ``chars``: every doubling of length holds the same number of tokens, so
    a model sees many short retrievals (which teach it to copy the key at all) and as many
    tokens of long ones (which teach it to copy from far away).
    """
    import random

    from herd.evaluation.needle import NEEDLE, QUESTION

    low, high = chars
    if not 0 < low <= high:
        raise ValueError(f"stdlib_passkey: chars={chars} must be (min, max) with 0 < min <= max")
    if documents <= 0:
        raise ValueError(f"stdlib_passkey: documents={documents} must be positive")
    prose = "\n\n".join(d.text for d in stdlib_prose(root) if d.text.strip())
    code = "\n\n".join(d.text for d in stdlib_code(root) if d.text.strip())
    rng = random.Random(seed)
    for index in range(documents):
        source = prose if index % 2 == 0 else code
        target = min(len(source), round(1 / rng.uniform(1 / high, 1 / low)))
        start = rng.randrange(0, len(source) - target + 1)
        haystack = source[start : start + target]
        cut = haystack.rfind(" ", 0, int(rng.random() * len(haystack))) + 1
        key = rng.randrange(10000, 100000)
        text = haystack[:cut] + NEEDLE.format(key=key).lstrip() + " " + haystack[cut:] + QUESTION + f" {key}."
        yield Document(f"passkey/{index:06d}", text)


def stdlib_prose(root: Path | None = None) -> Iterator[Document]:
    """One document per stdlib module: its docstrings (empty when it has none)."""
    root = (root or stdlib_dir()).resolve()
    for path in stdlib_files(root):
        relative = path.relative_to(root).as_posix()
        yield Document(relative, module_docstrings(path.read_bytes(), _module_name(relative)))


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
            yield from _definitions(_nested_statements(node), prefix)


def _nested_statements(node: ast.If | ast.Try | ast.With) -> list[ast.stmt]:
    """Statements inside an if/try/with block, in source order (definitions often hide there)."""
    statements = list(node.body)
    for handler in getattr(node, "handlers", []):
        statements += handler.body
    return statements + list(getattr(node, "orelse", [])) + list(getattr(node, "finalbody", []))


def _module_name(relative: str) -> str:
    parts = relative.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _read_source(path: Path) -> str:
    """A Python file's text, decoded by its coding cookie (utf-8 by default)."""
    data = path.read_bytes()
    encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    return data.decode(encoding, errors="replace")
