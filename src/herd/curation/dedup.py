"""Deduplication (paper 3.1.1): URL, near-duplicate documents (MinHash), and frequent lines.

- :class:`UrlDedup` keeps one document per URL: datatrove's exact dedup (signature, find, filter
  stages) on the URL. ``keep: first`` keeps the first seen; ``keep: latest`` the one with the
  latest ``date`` (the paper keeps the most recent version of each URL).
- :class:`MinHashDedup` removes near-duplicate documents: datatrove's MinHash stages (signatures
  of word n-gram shingles, LSH buckets, clusters, filter) with ``n_grams`` (shingle size),
  ``bands`` and ``rows`` (LSH: ``bands`` groups of ``rows`` hashes). LSH makes pairs of documents
  with Jaccard similarity ``s`` candidates with probability ``1 - (1 - s^rows)^bands``; with
  ``jaccard_threshold`` set, herd then computes each candidate pair's exact Jaccard similarity of
  shingles and keeps only pairs at or above it, so the threshold is the one configured, not the
  S-curve's. One document of each cluster stays.
- :class:`LineDedup` is the paper's rule (after ccNet): in each bucket of ``bucket_documents``
  consecutive documents (30M in the paper), a line that appears more than ``max_count`` times
  (6) is removed everywhere in the bucket; blank lines are kept. datatrove's sentence dedup
  differs (it removes repeated spans of 3 sentences across the whole corpus, keeping the first),
  hence herd's own. A document left without text is removed.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterator
from datetime import date, datetime
from itertools import islice
from pathlib import Path

import xxhash
from datatrove.pipeline.dedup.exact_dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
)
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.utils.hashing import HashConfig

from herd.curation.blocks import Block, CurationError, Documents, Verdict, subsequence_verdicts
from herd.curation.documents import Document, with_text
from herd.curation.words import WORDS

_EPOCH = date(1970, 1, 1)


def _url(doc: Document) -> str:
    return str(doc.metadata.get("url", ""))


class UrlDedup(Block):
    """One document per URL; documents without a URL pass. See the module docstring."""

    def __init__(self, name: str, options) -> None:
        super().__init__(name, options)
        self.keep = self.option("keep", "first")
        if self.keep not in ("first", "latest"):
            raise CurationError(f"blocks.{name}.keep must be 'first' or 'latest', got {self.keep!r}")

    def _priority(self, doc: Document) -> int:
        """datatrove keeps the duplicate of highest priority (1..65535): days since 1970 for latest."""
        if self.keep == "first" or not doc.metadata.get("date"):
            return 1
        try:
            day = datetime.fromisoformat(str(doc.metadata["date"]).replace("Z", "+00:00")).date()
        except ValueError:
            return 1
        return max(1, min(65535, (day - _EPOCH).days + 2))

    def run(self, documents: Documents, work: Path) -> Iterator[Verdict]:
        """Signatures of the URLs, duplicates found by datatrove, then the filter pass."""
        def has_url(doc: Document) -> bool:
            return bool(doc.metadata.get("url"))

        config = ExactDedupConfig(content_getter=_url, document_priority=self._priority)
        ExactDedupSignature(str(work / "signatures"), config).run(d for d in documents() if has_url(d))
        ExactFindDedups(str(work / "signatures"), str(work / "duplicates"), config).run()
        step = ExactDedupFilter(str(work / "duplicates"), config)
        with_urls = (d for d in documents() if has_url(d))
        yield from subsequence_verdicts(with_urls, step.run, "duplicate_url",
                                        lambda index, doc: f"URL {_url(doc)}")
        yield from (Verdict.keep(doc) for doc in documents() if not has_url(doc))


class MinHashDedup(Block):
    """Near-duplicate documents removed with datatrove's MinHash; see the module docstring."""

    def __init__(self, name: str, options) -> None:
        super().__init__(name, options)
        self.config = MinhashConfig(
            n_grams=self.number("n_grams", 5, 1, integer=True),
            num_buckets=self.number("bands", 14, 1, integer=True),
            hashes_per_bucket=self.number("rows", 8, 1, integer=True),
            seed=self.number("seed", 1, integer=True),
            hash_config=HashConfig(precision=64, hash_fc="xxhash"),
        )
        threshold = self.options.get("jaccard_threshold")
        self.threshold = None if threshold is None else self.number("jaccard_threshold", low=0, high=1)
        bands, rows = self.config.num_buckets, self.config.hashes_per_bucket
        self.notes["lsh"] = (f"{bands} bands x {rows} rows, shingles of {self.config.n_grams} words: pairs at "
                             f"Jaccard s are candidates with probability 1-(1-s^{rows})^{bands} "
                             f"(50% at s = {(1 - 0.5 ** (1 / bands)) ** (1 / rows):.2f})")

    def run(self, documents: Documents, work: Path) -> Iterator[Verdict]:
        """datatrove's four MinHash stages, with the exact Jaccard check between buckets and clusters."""
        signatures, buckets, clusters = (str(work / part) for part in ("signatures", "buckets", "clusters"))
        signature_step = MinhashDedupSignature(signatures, config=self.config, language=WORDS)
        signature_step.run(documents(), rank=0, world_size=1)
        bands = self.config.num_buckets
        bucket_step = MinhashDedupBuckets(signatures, buckets, config=self.config)
        for band in range(bands):
            bucket_step.run(rank=band, world_size=bands)
        similar = self._check_pairs(work / "buckets", signature_step, documents)
        MinhashDedupCluster(buckets, clusters, config=self.config).run()
        step = MinhashDedupFilter(clusters)

        def detail(index: int, doc: Document) -> str:
            if index not in similar:
                return ""
            other, jaccard = similar[index]
            return f"near-duplicate of {other}" + (f" (Jaccard {jaccard:.2f})" if jaccard is not None else "")

        yield from subsequence_verdicts(documents(), step.run, "near_duplicate", detail)

    def _check_pairs(self, folder: Path, signature_step: MinhashDedupSignature,
                     documents: Documents) -> dict[int, tuple[str, float | None]]:
        """Candidate pairs of the LSH buckets, less those under ``jaccard_threshold`` (rewritten in place).

        Returns, for each document in a kept pair, its most similar partner's id and the similarity.
        """
        files = sorted(folder.glob("*.dups"))
        pairs = {file: [(a, b) for _, a, _, b in struct.iter_unpack("<4I", file.read_bytes())] for file in files}
        members = {index for found in pairs.values() for pair in found for index in pair}
        shingles: dict[int, set[int]] = {}
        ids: dict[int, str] = {}
        if members:
            for index, doc in enumerate(documents()):
                if index in members:
                    ids[index] = doc.id
                    if self.threshold is not None:
                        shingles[index] = set(signature_step.get_shingles(doc.text).ravel().tolist())
        best: dict[int, tuple[str, float | None]] = {}
        for file, found in pairs.items():
            kept = []
            for a, b in found:
                jaccard = _jaccard(shingles[a], shingles[b]) if self.threshold is not None else None
                if jaccard is not None and jaccard < self.threshold:
                    continue
                kept.append((a, b))
                for this, other in ((a, b), (b, a)):
                    if this not in best or (jaccard or 0) > (best[this][1] or 0):
                        best[this] = (ids[other], jaccard)
            file.write_bytes(b"".join(struct.pack("<4I", 0, a, 0, b) for a, b in kept))
        self.notes["candidate_pairs"] = sum(len(found) for found in pairs.values())
        return best


def _jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class LineDedup(Block):
    """The paper's line dedup: lines seen more than ``max_count`` times in a bucket are removed."""

    def __init__(self, name: str, options) -> None:
        super().__init__(name, options)
        self.max_count = self.number("max_count", 6, 1, integer=True)
        self.bucket = self.number("bucket_documents", 30_000_000, 1, integer=True)
        self.min_chars = self.number("min_chars", 1, 1, integer=True)

    def _key(self, line: str) -> int | None:
        """The line's hash (white space at the ends ignored); None for lines that are never removed."""
        stripped = line.strip()
        return xxhash.xxh64_intdigest(stripped.encode("utf-8")) if len(stripped) >= self.min_chars else None

    def run(self, documents: Documents, work: Path) -> Iterator[Verdict]:
        """Per bucket: count every line, then strip the frequent ones (two passes, in step)."""
        counting, stripping = documents(), documents()
        frequent_examples: Counter[str] = Counter()
        while True:
            counts: Counter[int] = Counter()
            seen = 0
            for doc in islice(counting, self.bucket):
                seen += 1
                counts.update(key for line in doc.text.splitlines() if (key := self._key(line)) is not None)
            if not seen:
                break
            frequent = {key for key, count in counts.items() if count > self.max_count}
            for doc in islice(stripping, seen):
                yield self._strip(doc, frequent, counts, frequent_examples)
        self.notes["most_frequent_removed_lines"] = [
            f"{count} x {line!r}" for line, count in frequent_examples.most_common(10)]

    def _strip(self, doc: Document, frequent: set[int], counts: Counter[int],
               examples: Counter[str]) -> Verdict:
        lines = doc.text.splitlines(keepends=True)
        keys = [self._key(line) for line in lines]
        if not any(key in frequent for key in keys):
            return Verdict.keep(doc)
        kept = [line for line, key in zip(lines, keys, strict=True) if key not in frequent]
        cut = [line for line, key in zip(lines, keys, strict=True) if key in frequent]
        for line, key in zip(lines, keys, strict=True):
            if key in frequent and line.strip() not in examples:
                examples[line.strip()[:120]] = counts[key]
        text = "".join(kept)
        if not text.strip():
            return Verdict(doc, None, "only_frequent_lines", removed_text="".join(cut))
        tokens = self.count_tokens(text)
        return Verdict(doc, with_text(doc, text, tokens), "frequent_lines", f"{len(cut)} lines cut",
                       changed=True, removed_text="".join(cut))
