"""Documents on their way through curation: reading the sources, the stage files, counting tokens.

Curation reads the inputs ``herd.prepare`` reads (text files, folders, jsonl, the embedded
``stdlib:prose`` / ``stdlib:code``) as datatrove :class:`~datatrove.data.Document` objects, so
that datatrove's blocks take them as they are. Each document's ``metadata`` holds its
``source`` (the configured source name), its ``tokens`` (counted once here, again only when a
block changes its text) and, for jsonl inputs, the record's ``url`` and ``date`` fields when the
source names them. Blocks add their own annotations (``language``, ``quality``, ``bucket``...).

Between blocks the documents are stored as jsonl stage files (:func:`write_documents`,
:func:`read_documents`), so a block may read its input as many times as it needs (dedup reads
it twice) and memory stays flat whatever the corpus size.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datatrove.data import Document

from herd.data.inputs import BadInputError, OnBadInput, check_text, folder_files, jsonl_records, record_id
from herd.data.kinds.text import iter_documents
from herd.data.tokenizer import Tokenizer

__all__ = ["Document", "SourceInput", "TokenCounter", "read_documents", "read_sources", "write_documents"]

# A "word" when no tokenizer is given: a run of letters/digits, or one other visible character.
WORD = re.compile(r"\w+|[^\w\s]")
JSONL_SUFFIXES = (".jsonl", ".ndjson")  # read record by record, as herd.data.inputs does


@dataclass(frozen=True)
class SourceInput:
    """One configured source: its name, its inputs and how to read them."""

    name: str
    inputs: Sequence[str]
    text_field: str = "text"
    glob: str = "**/*"
    url_field: str | None = None     # jsonl field holding the document's URL (URL dedup)
    date_field: str | None = None    # jsonl field holding its crawl date (keep the latest URL)
    fields: Mapping[str, str] = field(default_factory=dict)  # other jsonl fields kept: metadata key -> field


def read_sources(sources: Iterable[SourceInput], on_bad_input: OnBadInput) -> Iterator[Document]:
    """Every document of every source, in order, with ``metadata["source"]`` set.

    jsonl files are read record by record so that the URL, date and other named fields come
    along; every other input goes through :func:`herd.data.kinds.text.iter_documents`, the reader
    of ``herd.prepare``. A file or line that is not text goes to ``on_bad_input``.
    """
    for source in sources:
        for item in source.inputs:
            for doc in _documents(source, str(item), on_bad_input):
                doc.metadata["source"] = source.name
                yield doc


def _documents(source: SourceInput, item: str, on_bad_input: OnBadInput) -> Iterator[Document]:
    path = Path(item).expanduser()
    if not item.startswith("stdlib:") and path.is_dir():
        for file in folder_files(path, source.glob):
            yield from _file_documents(source, file, file.relative_to(path).as_posix(), on_bad_input)
    elif not item.startswith("stdlib:") and path.is_file():
        yield from _file_documents(source, path, path.name, on_bad_input)
    else:  # stdlib:..., or missing (iter_documents names it)
        for doc in iter_documents(item, source.text_field, source.glob, on_bad_input):
            yield Document(text=doc.text, id=doc.id)


def _file_documents(source: SourceInput, path: Path, doc_id: str, on_bad_input: OnBadInput) -> Iterator[Document]:
    if path.suffix.lower() not in JSONL_SUFFIXES:
        for doc in iter_documents(path, source.text_field, source.glob, on_bad_input):
            yield Document(text=doc.text, id=doc_id)
        return
    for line, record in jsonl_records(path, on_bad_input, f"a {source.text_field!r} field"):
        where = f"{path}:{line}"
        text = record.get(source.text_field)
        if not isinstance(text, str):
            on_bad_input(BadInputError(
                f"{where}: no string {source.text_field!r} field (fields: {sorted(record)}); set the "
                "source's text_field to the field that holds the text", "missing_field", where))
            continue
        try:
            check_text(text, where, f"the {source.text_field!r} field", "fix or remove the line")
            own = record_id(record, where)
        except BadInputError as err:
            on_bad_input(err)
            continue
        metadata = {key: record[name] for key, name in source.fields.items() if name in record}
        for key, name in (("url", source.url_field), ("date", source.date_field)):
            if name and record.get(name) is not None:
                metadata[key] = str(record[name])
        yield Document(text=text, id=own or f"{doc_id}:{line}", metadata=metadata)


def write_documents(path: Path, documents: Iterable[Document]) -> int:
    """Write ``documents`` to the jsonl stage file ``path``; returns how many."""
    count = 0
    with open(path, "w", encoding="utf-8") as out:
        for doc in documents:
            out.write(json.dumps({"id": doc.id, "text": doc.text, "metadata": doc.metadata}, ensure_ascii=False))
            out.write("\n")
            count += 1
    return count


class DocumentWriter:
    """A stage file open for appending documents one at a time (a context manager)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self._file = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed in __exit__)

    def write(self, doc: Document) -> None:
        """Append one document."""
        self._file.write(json.dumps({"id": doc.id, "text": doc.text, "metadata": doc.metadata}, ensure_ascii=False))
        self._file.write("\n")
        self.count += 1

    def __enter__(self) -> DocumentWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def read_documents(path: Path, keep: Callable[[Document], bool] | None = None) -> Iterator[Document]:
    """The documents of a stage file, in order (only those ``keep`` accepts, if given)."""
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            doc = Document(text=record["text"], id=record["id"], metadata=record["metadata"])
            if keep is None or keep(doc):
                yield doc


class TokenCounter:
    """Counts the tokens of texts: with a tokenizer when one is given, else words (:data:`WORD`).

    ``unit`` says which ("tokens" or "words"); :meth:`ids` gives the units themselves (token ids,
    or lower-cased words) for the blocks that look at the token distribution.
    """

    def __init__(self, tokenizer_path: str | os.PathLike[str] | None = None) -> None:
        self.tokenizer = Tokenizer.load(tokenizer_path) if tokenizer_path else None
        self.unit = "tokens" if self.tokenizer else "words"

    def count(self, text: str) -> int:
        """How many units ``text`` holds."""
        return len(self.ids(text))

    def count_batch(self, texts: Sequence[str]) -> list[int]:
        """:meth:`count` of each text (batched through the tokenizer)."""
        if self.tokenizer:
            return [len(ids) for ids in self.tokenizer.encode_batch(list(texts))]
        return [len(WORD.findall(text)) for text in texts]

    def ids(self, text: str) -> list[Any]:
        """The units of ``text``: token ids, or lower-cased words."""
        if self.tokenizer:
            return self.tokenizer.encode(text)
        return [word.lower() for word in WORD.findall(text)]


def document_tokens(doc: Document) -> int:
    """The token count stored in a document's metadata (0 when not counted)."""
    return int(doc.metadata.get("tokens", 0))


def with_text(doc: Document, text: str, tokens: int) -> Document:
    """A copy of ``doc`` with new text and token count (the metadata is copied)."""
    return Document(text=text, id=doc.id, metadata={**doc.metadata, "tokens": tokens})
