"""What every curation block is: a step that reads documents and says, for each, what became of it.

A block gets a callable that returns a fresh iterator over its input documents (so a block that
needs two passes, like deduplication, takes two) and a work folder of its own, and yields one
:class:`Verdict` per input document: kept as it was, kept with a changed text (line dedup), or
removed, with the reason. The pipeline (:mod:`herd.curation.pipeline`) writes the kept documents
on to the next block and counts the rest for the report. :class:`DocumentFilter` is the simple
case: one decision per document, from the document alone.

Each block applies to the sources in its ``sources`` option (``null``: every source); the
documents of other sources pass it untouched.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from herd.curation.documents import Document

Documents = Callable[[], Iterator[Document]]


class CurationError(ValueError):
    """A curation option or input the user can fix; the message names it and the fix."""


@dataclass
class Verdict:
    """What a block made of one document.

    ``kept`` is the document that goes on (None: removed). When it is kept with another text,
    ``changed`` is True and ``removed_text`` holds what was cut (for the report's examples).
    ``reason`` names the rule that removed or changed it; ``detail`` says more (e.g. "near-duplicate
    of web.jsonl:12, Jaccard 0.91").
    """

    doc: Document
    kept: Document | None
    reason: str = ""
    detail: str = ""
    changed: bool = False
    removed_text: str = ""

    @classmethod
    def keep(cls, doc: Document) -> Verdict:
        """The document goes on unchanged."""
        return cls(doc, doc)

    @classmethod
    def remove(cls, doc: Document, reason: str, detail: str = "") -> Verdict:
        """The document is removed."""
        return cls(doc, None, reason, detail)


class Block(ABC):
    """One curation step; see the module docstring.

    ``options`` are the block's config keys (less ``enabled`` and ``sources``); a subclass reads
    them in ``__init__`` and raises :class:`CurationError` naming ``blocks.<name>.<key>`` for a bad
    one. ``count_tokens`` counts the tokens of a changed text (set by the pipeline).
    """

    name: str = "block"

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        self.name = name
        self.options = dict(options)
        self.count_tokens: Callable[[str], int] = lambda text: len(text.split())
        self.notes: dict[str, Any] = {}   # what the report shows about this block beyond the counts

    @abstractmethod
    def run(self, documents: Documents, work: Path) -> Iterator[Verdict]:
        """One verdict per document of ``documents()``, in order."""

    def option(self, key: str, default: Any = None) -> Any:
        """The option ``key`` (``default`` when unset)."""
        value = self.options.get(key)
        return default if value is None else value

    def number(self, key: str, default: float | None = None, low: float | None = None,
               high: float | None = None, integer: bool = False) -> Any:
        """The numeric option ``key``, checked to lie in [low, high]."""
        value = self.option(key, default)
        kind = int if integer else (int, float)
        if not isinstance(value, kind) or isinstance(value, bool) or (low is not None and value < low) or (
                high is not None and value > high):
            span = f" in [{low}, {high}]" if high is not None else (f" >= {low}" if low is not None else "")
            raise CurationError(f"blocks.{self.name}.{key} must be {'an integer' if integer else 'a number'}"
                                f"{span}, got {value!r}")
        return value


class DocumentFilter(Block):
    """A block that decides on each document alone: override :meth:`judge`."""

    @abstractmethod
    def judge(self, doc: Document) -> tuple[bool, str]:
        """(keep?, reason when removed)."""

    def run(self, documents: Documents, work: Path) -> Iterator[Verdict]:
        """One :meth:`judge` per document."""
        for doc in documents():
            keep, reason = self.judge(doc)
            yield Verdict.keep(doc) if keep else Verdict.remove(doc, reason)


def subsequence_verdicts(inputs: Iterator[Document], step: Callable[[Iterator[Document]], Iterator[Document]],
                         reason: str, detail: Callable[[int, Document], str] | None = None) -> Iterator[Verdict]:
    """Verdicts for a step that only drops documents (a datatrove filter stage): ``step(docs)``
    yields a subsequence of ``docs``.

    Each input is recorded as the step reads it, so this works on a stream: the documents the step
    read and did not yield before the next one it yields were removed. ``detail(index, doc)``
    describes a removal (``index``: the document's position in ``inputs``).
    """
    pending: deque[tuple[int, Document]] = deque()

    def recorded() -> Iterator[Document]:
        for index, doc in enumerate(inputs):
            pending.append((index, doc))
            yield doc

    def removed(index: int, doc: Document) -> Verdict:
        return Verdict.remove(doc, reason, detail(index, doc) if detail else "")

    for doc in step(recorded()):
        while pending and pending[0][1] is not doc:
            yield removed(*pending.popleft())
        if not pending:
            raise RuntimeError(f"a block yielded a document it was not given: {doc.id}")
        pending.popleft()
        yield Verdict.keep(doc)
    yield from (removed(index, doc) for index, doc in pending)
