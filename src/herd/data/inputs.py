"""Reading the user's inputs as documents: text files, folders and jsonl, checked to be text.

Every input yields :class:`Document` objects in a deterministic order. A document's ``id`` is
stable across machines (paths are relative), so hashing it assigns the same documents to the
validation split everywhere. The embedded ``stdlib:`` inputs live in :mod:`herd.data.embedded`;
:func:`herd.data.kinds.text.iter_documents` reads both.

Files and jsonl records are checked to be text: a file that is not UTF-8, a jsonl line that is
not a JSON object with a string in ``text_field``, and any text holding a NUL character or more
than :data:`MAX_CONTROL_SHARE` of control characters (other than tab, newlines, form feed and
vertical tab) is a :class:`BadInputError`, whose ``reason`` is one of :data:`BAD_INPUT_REASONS`.
By default it is raised; pass an ``on_bad_input`` callback to skip it instead.
Every kind of example read from jsonl (text, dialogs, preferences, media) starts at
:func:`jsonl_records`, which reads each line with a bounded ``readline``: a line longer than
``max_line_bytes`` (:data:`MAX_LINE_BYTES` by default, ``herd.prepare``'s ``max_line_bytes`` through
:func:`line_limit`) is a :class:`BadInputError` (``too_long_line``) before it is decoded, parsed or
tokenized, and reading it holds at most about ``max_line_bytes`` plus one chunk in memory.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_JSONL_SUFFIXES = (".jsonl", ".ndjson")

# Why an input is not usable text (BadInputError.reason).
BAD_INPUT_REASONS = ("not_utf8", "binary", "malformed_json", "not_an_object", "missing_field", "not_a_string",
                     "too_long_line")
# The longest jsonl line read (bytes, without its newline); longer ones are skipped unread (too_long_line).
MAX_LINE_BYTES = 8 * 1024**2
_SKIP_CHUNK_BYTES = 1024**2  # what reading past a too-long line holds at a time
_max_line_bytes: ContextVar[int] = ContextVar("max_line_bytes", default=MAX_LINE_BYTES)
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


def folder_documents(
    folder: Path, text_field: str = "text", glob: str = "**/*", on_bad_input: OnBadInput = raise_bad_input
) -> Iterator[Document]:
    """Every non-hidden file under ``folder`` matching ``glob``, in sorted order."""
    for file in folder_files(folder, glob):
        yield from file_documents(file, file.relative_to(folder).as_posix(), text_field, on_bad_input)


def jsonl_files(item: str, glob: str, embedded: str) -> Iterator[tuple[Path, str]]:
    """``(file, id)`` of each file of one input: the file itself, or a folder's files matching ``glob``.

    The id is the file's path relative to the folder (its name for a file). A missing input raises
    FileNotFoundError naming it, with ``embedded`` (the embedded inputs of the kind) as the other choice.
    """
    path = Path(item).expanduser()
    if path.is_dir():
        for file in folder_files(path, glob):
            yield file, file.relative_to(path).as_posix()
    elif path.is_file():
        yield path, path.name
    else:
        raise FileNotFoundError(f"input not found: {path} (neither a file nor a folder). Fix the source's input "
                                f"path, or use {embedded}.")


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
    """One document per non-blank line of a jsonl file; bad lines are reported as ``file:line``.

    A document's id is the line's ``id`` field where it has one (:func:`record_id`), else
    ``<doc_id>:<line>``."""
    doc_id = doc_id or path.name
    for line_number, record in jsonl_records(path, on_bad_input, f"a {text_field!r} field"):
        where = f"{path}:{line_number}"
        try:
            text = _record_text(record, where, text_field)
            own = record_id(record, where)
        except BadInputError as err:
            on_bad_input(err)
            continue
        yield Document(own or f"{doc_id}:{line_number}", text)


def record_id(record: Mapping[str, Any], where: str) -> str | None:
    """A jsonl text line's own ``id`` (None without one), which names its document and decides its split:
    ``herd.curate`` writes its inputs' ids there, so a curated corpus keeps their train/val split. An integer
    id is taken as its decimal string; any other ``id`` than a non-empty string is a BadInputError
    (``not_a_string``) at ``where``."""
    value = record.get("id")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if value is not None and (not isinstance(value, str) or not value):
        raise BadInputError(f"{where}: field 'id' must be a non-empty string or an integer, got {value!r}; fix or "
                            "remove the line", "not_a_string", where)
    return value


@contextmanager
def line_limit(max_line_bytes: int) -> Iterator[None]:
    """Within the block, :func:`jsonl_records` skips lines longer than ``max_line_bytes`` (a positive int)."""
    if not isinstance(max_line_bytes, int) or isinstance(max_line_bytes, bool) or max_line_bytes < 1:
        raise ValueError(f"max_line_bytes must be a positive number of bytes, got {max_line_bytes!r}")
    token = _max_line_bytes.set(max_line_bytes)
    try:
        yield
    finally:
        _max_line_bytes.reset(token)


def jsonl_records(
    path: Path, on_bad_input: OnBadInput = raise_bad_input, expected: str = "fields", max_line_bytes: int | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, JSON object)`` of each non-blank line of a jsonl file.

    A line that is not UTF-8, not JSON or not a JSON object goes to ``on_bad_input`` as a
    :class:`BadInputError` located at ``file:line`` (reasons ``not_utf8``, ``malformed_json``,
    ``not_an_object``); ``expected`` says in that message what an object should hold. A line
    longer than ``max_line_bytes`` (None: the :func:`line_limit` in force, else
    :data:`MAX_LINE_BYTES`) is reported as ``too_long_line`` without being decoded or kept in
    memory. Every kind of example read from jsonl (text, dialogs, preferences, media) starts here.
    """
    limit = max_line_bytes if max_line_bytes is not None else _max_line_bytes.get()
    with open(path, "rb") as lines:
        line_number = 0
        while raw := lines.readline(limit + 1):
            line_number += 1
            where = f"{path}:{line_number}"
            if len(raw) > limit and not raw.endswith(b"\n"):
                size = len(raw) + _skip_rest_of_line(lines)
                on_bad_input(BadInputError(
                    f"{where}: the line is {size:,} bytes, more than max_line_bytes={limit:,}: skipped unread; "
                    "raise max_line_bytes to keep such lines, or shorten the line", "too_long_line", where))
                continue
            # surrogateescape: a line that is not UTF-8 is reported alone, and the next lines still read
            line = raw.decode("utf-8", errors="surrogateescape")
            del raw
            if line.strip():
                try:
                    record = _jsonl_object(line, where, expected)
                except BadInputError as err:
                    on_bad_input(err)
                    continue
                yield line_number, record


def _skip_rest_of_line(lines) -> int:
    """Read past the rest of the current line a chunk at a time; returns its bytes (without the newline)."""
    skipped = 0
    while chunk := lines.readline(_SKIP_CHUNK_BYTES):
        if chunk.endswith(b"\n"):
            return skipped + len(chunk) - 1
        skipped += len(chunk)
    return skipped


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


def query_options(item: str, types: Mapping[str, Callable[[str], Any]]) -> dict[str, Any]:
    """The options given in an embedded input's query string (``stdlib:sft?seed=1&system=Be%20brief``).

    ``types`` maps each option the input takes to its type (``int`` or ``str``). ValueError names
    the input and an unknown option (with the ones it takes) or a value of the wrong type.
    """
    from urllib.parse import parse_qsl

    name, _, query = item.partition("?")
    options: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if key not in types:
            raise ValueError(f"input {item!r}: unknown option {key!r}; {name} takes {sorted(types)}")
        try:
            options[key] = types[key](value)
        except ValueError:
            raise ValueError(f"input {item!r}: option {key}={value!r} must be an integer") from None
    return options


def int_options(item: str, defaults: Mapping[str, int]) -> dict[str, int]:
    """The integer options of an embedded input (``stdlib:shapes?count=40&seed=1``), defaults filled in."""
    return {**defaults, **query_options(item, dict.fromkeys(defaults, int))}
