"""Decontamination (paper 5.1.4): n-gram overlap of evaluation sets with the curated training data.

Following the paper, a token of an evaluation item is contaminated when it lies in an ``n``-gram
(8 by default) that also occurs in the training data; an item is contaminated when the share of
its contaminated tokens reaches ``threshold``. Tokens here are lower-cased words (datatrove's text
normalisation: punctuation and accents removed, numbers folded), so formatting differences do not
hide an overlap.

``eval_sets`` maps a name to an input: a jsonl file of items (``fields``: the fields whose text
makes the item, e.g. ``[question, choices, answer]``; lists are joined), a text file or folder, or
herd's own held-out sets: ``stdlib:sft`` (the embedded questions and answers, each dialog's messages
joined) and ``stdlib:mcq`` (the embedded multiple-choice items of ``herd.evaluate``: each documented
public stdlib definition, its signature and the first sentence of its docstring, which is the
right answer; the item ids are the definition's dotted names, as ``herd.evaluate`` gives them,
whichever modules it holds out). Every item of every set is checked; the block keeps the training documents (``action:
report``) or removes those that share an n-gram with a contaminated item (``action: remove``).
The report lists the contaminated items, and ``contaminated.jsonl`` in the output folder holds
their ids for the evaluation to leave out (``herd.evaluate exclude=<output_dir>/contaminated.jsonl``).
A jsonl item's id is its ``id`` field, else ``<file name>:<line number>``, as ``herd.evaluate``
names the items it reads from jsonl.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash
from datatrove.utils.text import simplify_text

from herd.curation.blocks import Block, CurationError, Documents, Verdict
from herd.curation.documents import SourceInput, read_sources
from herd.curation.words import WORDS
from herd.data.embedded.sft import STDLIB_SFT, stdlib_definitions, stdlib_sft
from herd.data.inputs import jsonl_records, raise_bad_input
from herd.paths import resolve

STDLIB_MCQ = "stdlib:mcq"


@dataclass
class EvalItem:
    """One evaluation item: where it comes from, its text and its n-grams (hash -> first position)."""

    set: str
    id: str
    text: str
    words: int
    ngrams: dict[int, list[int]] = field(default_factory=dict)
    covered: set[int] = field(default_factory=set)   # word positions in a matched n-gram
    seen_in: str = ""                                 # a training document holding one of them

    def coverage(self) -> float:
        """The share of the item's words in an n-gram found in the training data."""
        return len(self.covered) / self.words if self.words else 0.0


def words(text: str) -> list[str]:
    """The normalised words of ``text`` (lower-cased, no punctuation, numbers folded)."""
    return WORDS.word_tokenize(simplify_text(text))


def ngram_hashes(tokens: list[str], n: int) -> Iterator[tuple[int, int]]:
    """(hash, start) of every n-gram of ``tokens``."""
    for start in range(len(tokens) - n + 1):
        yield xxhash.xxh64_intdigest(" ".join(tokens[start:start + n]).encode("utf-8")), start


class Decontaminate(Block):
    """n-gram overlap of evaluation sets with the training documents; see the module docstring."""

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        super().__init__(name, options)
        self.n = self.number("n", 8, 1, integer=True)
        self.threshold = self.number("threshold", 0.5, 0, 1)
        self.action = self.option("action", "report")
        if self.action not in ("report", "remove"):
            raise CurationError(f"blocks.{name}.action must be 'report' or 'remove', got {self.action!r}")
        sets = self.options.get("eval_sets")
        if not sets:
            raise CurationError(f"blocks.{name}.eval_sets is empty: map names to evaluation inputs, e.g. "
                                f"'blocks.{name}.eval_sets={{sft: stdlib:sft, mmlu: /data/mmlu.jsonl}}', or "
                                f"blocks.{name}.enabled=false")
        fields = self.options.get("fields") or ["text"]
        self.items = [item for set_name, spec in sets.items() for item in _eval_items(str(set_name), spec, fields)]
        self.index: dict[int, list[tuple[EvalItem, int]]] = {}
        for item in self.items:
            tokens = words(item.text)
            item.words = len(tokens)
            for value, start in ngram_hashes(tokens, self.n):
                self.index.setdefault(value, []).append((item, start))
        self.contaminated: list[EvalItem] = []

    def run(self, documents: Documents, work: Path) -> Iterator[Verdict]:
        """Pass 1 marks the items' n-grams found in training documents; pass 2 keeps or removes."""
        for doc in documents():
            for value, _ in ngram_hashes(words(doc.text), self.n):
                for item, start in self.index.get(value, ()):
                    item.covered.update(range(start, start + self.n))
                    item.seen_in = item.seen_in or doc.id
        self.contaminated = [item for item in self.items if item.words and item.coverage() >= self.threshold]
        self.notes["items checked"] = len(self.items)
        self.notes["contaminated items"] = len(self.contaminated)
        self.notes["contaminated"] = [
            f"{item.set}/{item.id}: {item.coverage():.0%} of its words in {self.n}-grams of the training data "
            f"(e.g. {item.seen_in}): {item.text[:160]!r}" for item in self.contaminated]
        if self.action == "report" or not self.contaminated:
            yield from (Verdict.keep(doc) for doc in documents())
            return
        flagged = {value for item in self.contaminated for value, _ in ngram_hashes(words(item.text), self.n)}
        for doc in documents():
            hit = next((v for v, _ in ngram_hashes(words(doc.text), self.n) if v in flagged), None)
            yield Verdict.keep(doc) if hit is None else Verdict.remove(doc, "overlaps_eval_item")

    def write_list(self, path: Path) -> Path:
        """The contaminated items, one json object a line (set, id, coverage, seen_in)."""
        with open(path, "w", encoding="utf-8") as out:
            for item in self.contaminated:
                out.write(json.dumps({"set": item.set, "id": item.id, "coverage": round(item.coverage(), 4),
                                      "seen_in": item.seen_in}) + "\n")
        return path


def _eval_items(name: str, spec: Any, fields: list[str]) -> Iterator[EvalItem]:
    """The items of one evaluation set (see the module docstring)."""
    if isinstance(spec, Mapping):
        fields = list(spec.get("fields") or fields)
        spec = spec.get("input")
    item = str(spec)
    if item.split("?")[0] == STDLIB_SFT:
        for dialog in stdlib_sft():
            yield EvalItem(name, dialog.id, "\n".join(m["content"] for m in dialog.messages), 0)
        return
    if item == STDLIB_MCQ:
        for definition in stdlib_definitions():
            yield EvalItem(name, definition.name, f"{definition.signature}\n{definition.summary}", 0)
        return
    path = resolve(item)
    if path.is_file() and path.suffix.lower() in (".jsonl", ".ndjson"):
        for line, record in jsonl_records(path, raise_bad_input):
            parts = [record[f] for f in fields if f in record]
            if not parts:
                raise CurationError(f"{path}:{line}: none of the fields {fields} (set the eval set's fields)")
            text = "\n".join(" ".join(map(str, p)) if isinstance(p, list) else str(p) for p in parts)
            yield EvalItem(name, str(record.get("id", f"{path.name}:{line}")), text, 0)
        return
    for doc in read_sources([SourceInput(name, [item])], raise_bad_input):
        yield EvalItem(name, doc.id, doc.text, 0)
