"""Heuristic filters (paper 3.1.1): repetition, Gopher quality rules, dirty words, token-distribution KL.

- :class:`RepetitionFilter` is datatrove's Gopher repetition filter (Rae et al. 2021, Table A1):
  duplicated lines and paragraphs, the top 2-4-gram's share and the duplicated 5-10-gram coverage
  of the characters. It removes the logs and error dumps the paper's "duplicated n-gram coverage
  ratio" is for. Thresholds are options (``dup_n_grams: [[5, 0.15], ...]``).
- :class:`GopherQuality` is datatrove's Gopher quality filter (length, mean word length, symbols,
  bullets, stop words); English prose only.
- :class:`DirtyWords` counts the words of a user's list (one word or phrase a line); a document
  with more than ``max_ratio`` of its words on the list, or ``max_count`` of them, is removed (the
  paper uses such counts to filter adult websites).
- :class:`KLFilter` is herd's: for each document, the KL divergence of its token distribution
  from the corpus' (per source, smoothed), in nats. Documents made of tokens the corpus rarely
  uses (encoded blobs, mojibake, tables of numbers) stand far above the rest. A document is
  removed above ``max_kl`` when that is set, else above the median + ``mad_k`` median absolute
  deviations of the documents' values. Documents under ``min_tokens`` are left alone: few tokens
  say little about a distribution.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from datatrove.pipeline.filters.base_filter import get_filter_result
from datatrove.pipeline.filters.gopher_quality_filter import GopherQualityFilter
from datatrove.pipeline.filters.gopher_repetition_filter import GopherRepetitionFilter

from herd.curation.blocks import Block, CurationError, DocumentFilter, Documents, Verdict
from herd.curation.documents import WORD, Document, TokenCounter
from herd.curation.words import WORDS
from herd.paths import resolve


def _pairs(value, key: str) -> tuple[tuple[int, float], ...]:
    try:
        return tuple((int(n), float(frac)) for n, frac in value)
    except (TypeError, ValueError):
        raise CurationError(f"{key} must be a list of [n, fraction] pairs, got {value!r}") from None


class RepetitionFilter(DocumentFilter):
    """datatrove's Gopher repetition filter; see the module docstring."""

    def __init__(self, name: str, options) -> None:
        super().__init__(name, options)
        extra = {}
        for key in ("top_n_grams", "dup_n_grams"):
            if self.options.get(key) is not None:
                extra[key] = _pairs(self.options[key], f"blocks.{name}.{key}")
        for key in ("dup_line_frac", "dup_para_frac", "dup_line_char_frac", "dup_para_char_frac"):
            if key in self.options:
                extra[key] = self.options[key]
        self.min_words = self.number("min_words", 50, 0, integer=True)
        self.filter = GopherRepetitionFilter(language=WORDS, **extra)

    def judge(self, doc: Document) -> tuple[bool, str]:
        """Gopher's repetition rules; the reason names the rule that fired."""
        if len(doc.text.split()) < self.min_words:
            return True, ""
        keep, reason = get_filter_result(self.filter.filter(doc))
        return keep, reason or ""


class GopherQuality(DocumentFilter):
    """datatrove's Gopher quality filter; options are its keyword arguments."""

    def __init__(self, name: str, options) -> None:
        super().__init__(name, options)
        try:
            self.filter = GopherQualityFilter(language=WORDS, **self.options)
        except TypeError as err:
            raise CurationError(f"blocks.{name}: {err}") from None

    def judge(self, doc: Document) -> tuple[bool, str]:
        """Gopher's quality rules; the reason names the rule that fired."""
        keep, reason = get_filter_result(self.filter.filter(doc))
        return keep, reason or ""


class DirtyWords(DocumentFilter):
    """Documents with too many words of a user's list; see the module docstring."""

    def __init__(self, name: str, options) -> None:
        super().__init__(name, options)
        words = list(self.option("words", []))
        if self.options.get("word_list"):
            path = resolve(str(self.options["word_list"]))
            if not path.is_file():
                raise CurationError(f"blocks.{name}.word_list: {path} is not a file; give a text file with one "
                                    "word or phrase per line")
            words += [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        phrases = {tuple(w.lower() for w in WORD.findall(word)) for word in words if word.strip()}
        if not phrases:
            raise CurationError(f"blocks.{name}: no words to look for; set blocks.{name}.word_list (a file, one "
                                f"word a line) or blocks.{name}.words, or blocks.{name}.enabled=false")
        self.phrases = phrases
        self.longest = max(len(p) for p in phrases)
        self.max_ratio = self.number("max_ratio", 0.01, 0, 1)
        self.max_count = self.options.get("max_count")

    def judge(self, doc: Document) -> tuple[bool, str]:
        """Count the listed words and phrases among the document's words."""
        words = [w.lower() for w in WORD.findall(doc.text) if w.isalnum() or w == "'"]
        hits = sum(1 for n in range(1, self.longest + 1) for i in range(len(words) - n + 1)
                   if tuple(words[i:i + n]) in self.phrases)
        if self.max_count is not None and hits > self.max_count:
            return False, "dirty_word_count"
        if words and hits / len(words) > self.max_ratio:
            return False, "dirty_word_ratio"
        return True, ""


class KLFilter(Block):
    """Token-distribution outliers; see the module docstring."""

    def __init__(self, name: str, options) -> None:
        super().__init__(name, options)
        self.max_kl = None if options.get("max_kl") is None else self.number("max_kl", low=0)
        self.mad_k = self.number("mad_k", 5.0, 0)
        self.min_tokens = self.number("min_tokens", 20, 1, integer=True)
        self.smoothing = self.number("smoothing", 0.5, 0)
        self.counter: TokenCounter | None = None   # set by the pipeline: token ids, or words

    def run(self, documents: Documents, work: Path) -> Iterator[Verdict]:
        """Pass 1: each source's token distribution; pass 2: each document's KL divergence from it."""
        counter = self.counter or TokenCounter()
        corpus: dict[str, Counter] = {}
        for doc in documents():
            corpus.setdefault(doc.metadata.get("source", ""), Counter()).update(counter.ids(doc.text))
        divergences = [self._divergence(doc, corpus, counter) for doc in documents()]  # one float a document
        limits = self._limits(divergences, [doc.metadata.get("source", "") for doc in documents()])
        self.notes["limits (nats)"] = {source: round(limit, 3) for source, limit in limits.items()}
        for doc, kl in zip(documents(), divergences, strict=True):
            limit = limits[doc.metadata.get("source", "")]
            if kl is not None and kl > limit:
                yield Verdict.remove(doc, "token_distribution_outlier", f"KL {kl:.2f} > {limit:.2f} nats")
            else:
                yield Verdict.keep(doc)

    def _divergence(self, doc: Document, corpus: dict[str, Counter], counter: TokenCounter) -> float | None:
        ids = counter.ids(doc.text)
        if len(ids) < self.min_tokens:
            return None
        reference = corpus[doc.metadata.get("source", "")]
        total = sum(reference.values())
        vocabulary = len(reference) + 1
        own = Counter(ids)
        kl = 0.0
        for token, count in own.items():
            p = count / len(ids)
            q = (reference[token] + self.smoothing) / (total + self.smoothing * vocabulary)
            kl += p * math.log(p / q)
        return kl

    def _limits(self, divergences: list[float | None], sources: list[str]) -> dict[str, float]:
        by_source: dict[str, list[float]] = {}
        for kl, source in zip(divergences, sources, strict=True):
            if kl is not None:
                by_source.setdefault(source, []).append(kl)
        limits: dict[str, float] = {}
        for source, values in by_source.items():
            if self.max_kl is not None:
                limits[source] = self.max_kl
                continue
            median = float(np.median(values))
            mad = float(np.median(np.abs(np.asarray(values) - median)))
            limits[source] = median + self.mad_k * max(mad, 1e-6)
        return _DefaultLimit(limits)


class _DefaultLimit(dict):
    """Limits per source; a source with no measured document has no limit."""

    def __missing__(self, key: str) -> float:
        return math.inf
