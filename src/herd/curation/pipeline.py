"""The curation pipeline: sources -> ordered blocks -> curated jsonl + report.

:func:`run_curation` reads every source into a first stage file (counting each document's
tokens), then runs the blocks of ``order`` that are enabled, one after another: each reads the
previous stage file and writes the next, and its verdicts are counted per reason with a few
examples (:class:`BlockStats`). The last stage is written to ``<output_dir>/<name>.jsonl``, one
file per source (``split_by: source``) or per knowledge bucket (``split_by: bucket``), each line
``{"text", "id", "source", ...annotations}``: what ``herd.prepare`` reads as a jsonl source. The
report (:mod:`herd.curation.report`) goes beside them.

Stage files live in a hidden work folder inside ``output_dir``: each is removed once the next
block has read it, and the folder at the end, unless ``keep_work`` is set (then every stage file
stays: ``00-sources.jsonl``, then ``<number>-<block>.jsonl`` after each block). A source named in a block's ``sources`` must exist; ``skip_sources`` names
that do not exist are ignored (the defaults skip ``code`` for the prose heuristics).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from herd.curation.blocks import Block, CurationError, Verdict
from herd.curation.classify import KnowledgeClassifier, QualityClassifier
from herd.curation.decontaminate import Decontaminate
from herd.curation.dedup import LineDedup, MinHashDedup, UrlDedup
from herd.curation.documents import (
    Document,
    DocumentWriter,
    SourceInput,
    TokenCounter,
    document_tokens,
    read_documents,
    read_sources,
)
from herd.curation.filters import DirtyWords, GopherQuality, KLFilter, RepetitionFilter
from herd.curation.language import LanguageId
from herd.curation.mix import LLAMA3_MIX, bucket_weights, natural_mix, source_weights
from herd.data.inputs import BadInputError, raise_bad_input
from herd.paths import resolve

logger = logging.getLogger(__name__)

BLOCK_TYPES: dict[str, type[Block]] = {
    "url_dedup": UrlDedup,
    "minhash": MinHashDedup,
    "line_dedup": LineDedup,
    "repetition": RepetitionFilter,
    "gopher_quality": GopherQuality,
    "dirty_words": DirtyWords,
    "kl": KLFilter,
    "language": LanguageId,
    "quality": QualityClassifier,
    "knowledge": KnowledgeClassifier,
    "decontaminate": Decontaminate,
}
_PIPELINE_KEYS = ("enabled", "type", "sources", "skip_sources")
_CLASSIFIERS = (QualityClassifier, KnowledgeClassifier)
_ANNOTATIONS = ("url", "language", "language_score", "quality", "bucket")  # metadata copied to the output


@dataclass
class BlockStats:
    """What one block did: documents and tokens in, removed, changed; reasons and examples."""

    name: str
    unit: str
    documents_in: int = 0
    tokens_in: int = 0
    removed_documents: int = 0
    removed_tokens: int = 0
    changed_documents: int = 0
    cut_tokens: int = 0
    seconds: float = 0.0
    reasons: Counter = field(default_factory=Counter)
    examples: list[dict[str, str]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def add(self, verdict: Verdict, max_examples: int, example_chars: int) -> None:
        """Count one verdict (and keep it as an example while there are fewer than ``max_examples``)."""
        tokens = document_tokens(verdict.doc)
        self.documents_in += 1
        self.tokens_in += tokens
        if verdict.kept is None:
            self.removed_documents += 1
            self.removed_tokens += tokens
        elif verdict.changed:
            self.changed_documents += 1
            self.cut_tokens += tokens - document_tokens(verdict.kept)
        else:
            return
        self.reasons[verdict.reason] += 1
        if sum(e["reason"] == verdict.reason for e in self.examples) < max_examples:
            text = verdict.removed_text if verdict.changed else verdict.doc.text
            self.examples.append({"reason": verdict.reason, "id": verdict.doc.id, "detail": verdict.detail,
                                  "text": _clip(text, example_chars),
                                  "what": "cut from" if verdict.changed else "removed"})

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"name": self.name, "documents_in": self.documents_in, "tokens_in": self.tokens_in,
                "removed_documents": self.removed_documents, "removed_tokens": self.removed_tokens,
                "changed_documents": self.changed_documents, "cut_tokens": self.cut_tokens,
                "seconds": round(self.seconds, 3), "reasons": dict(self.reasons), "examples": self.examples,
                "notes": self.notes}


@dataclass
class CurationResult:
    """The outcome of one run: output files, per-block stats, mix weights, timing."""

    output_dir: Path
    files: dict[str, Path]
    unit: str
    documents_in: int
    tokens_in: int
    documents_out: int
    tokens_out: int
    blocks: list[BlockStats]
    seconds: float
    read_seconds: float
    mix: dict[str, Any] = field(default_factory=dict)
    skipped_inputs: dict[str, int] = field(default_factory=dict)
    report: Path | None = None

    def documents_per_second(self) -> float:
        """Documents read per second of the whole run (one process: per core)."""
        return self.documents_in / self.seconds if self.seconds else 0.0


def _clip(text: str, limit: int) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit].rstrip() + " ..."


def source_inputs(sources: Mapping[str, Any]) -> list[SourceInput]:
    """The configured sources (``sources.<name>.{input, text_field, glob, url_field, date_field}``)."""
    if not sources:
        raise CurationError("no sources configured; set sources.<name>.input (a file, folder, jsonl, "
                            "stdlib:prose or stdlib:code)")
    specs = []
    for name, source in sources.items():
        if not isinstance(source, Mapping) or not source.get("input"):
            raise CurationError(f"sources.{name}.input is missing: give a file, folder, jsonl, 'stdlib:prose' "
                                "or 'stdlib:code'")
        raw = source["input"]
        inputs = [raw] if isinstance(raw, str) else [str(i) for i in raw]
        inputs = [i if i.startswith("stdlib:") else str(resolve(i)) for i in inputs]
        unknown = sorted(set(source) - {"input", "text_field", "glob", "url_field", "date_field", "weight"})
        if unknown:
            raise CurationError(f"sources.{name}: unknown key(s) {unknown}; a source takes input, text_field, "
                                "glob, url_field, date_field")
        specs.append(SourceInput(str(name), inputs, str(source.get("text_field") or "text"),
                                 str(source.get("glob") or "**/*"), source.get("url_field"),
                                 source.get("date_field")))
    return specs


def build_blocks(order: list[str], blocks: Mapping[str, Any], source_names: set[str],
                 models_dir: Path) -> list[tuple[Block, Callable[[Document], bool]]]:
    """The enabled blocks of ``order``, each with the test of the documents it applies to."""
    built = []
    for name in order:
        if name not in blocks:
            raise CurationError(f"order names {name!r}, which has no entry in blocks (blocks: {sorted(blocks)})")
        options = dict(blocks[name] or {})
        if not options.get("enabled", True):
            continue
        kind = options.get("type") or name
        if kind not in BLOCK_TYPES:
            raise CurationError(f"blocks.{name}: unknown block type {kind!r}; set blocks.{name}.type to one of "
                                f"{sorted(BLOCK_TYPES)}")
        only = options.get("sources")
        if only is not None and (missing := sorted(set(only) - source_names)):
            raise CurationError(f"blocks.{name}.sources names {missing}, which are not configured sources "
                                f"({sorted(source_names)})")
        applies = _applies(None if only is None else set(only), set(options.get("skip_sources") or ()))
        block_options = {k: v for k, v in options.items() if k not in _PIPELINE_KEYS}
        cls = BLOCK_TYPES[kind]
        block = cls(name, block_options, models_dir) if issubclass(cls, _CLASSIFIERS) else cls(name, block_options)
        built.append((block, applies))
    return built


def _applies(only: set[str] | None, skip: set[str]) -> Callable[[Document], bool]:
    def test(doc: Document) -> bool:
        source = doc.metadata.get("source")
        return source not in skip and (only is None or source in only)
    return test


def run_curation(cfg: Mapping[str, Any]) -> CurationResult:
    """Curate as configured (see configs/curate.yaml); returns the result, the report written."""
    from herd.curation.report import write_report

    started = time.perf_counter()
    out = resolve(str(cfg.get("output_dir") or ""))
    if not cfg.get("output_dir"):
        raise CurationError("output_dir is not set: give the folder to write the curated jsonl and report to")
    sources = source_inputs(cfg.get("sources") or {})
    split_by = cfg.get("split_by", "source")
    if split_by not in ("source", "bucket"):
        raise CurationError(f"split_by must be 'source' or 'bucket', got {split_by!r}")
    report_cfg = dict(cfg.get("report") or {})
    max_examples, example_chars = int(report_cfg.get("examples", 3)), int(report_cfg.get("example_chars", 300))
    counter = TokenCounter((cfg.get("tokenizer") or {}).get("path"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out, prefix=".curate-"))
    try:
        blocks = build_blocks(list(cfg.get("order") or []), cfg.get("blocks") or {}, {s.name for s in sources},
                              out / "models")
        if split_by == "bucket" and not any(isinstance(b, KnowledgeClassifier) for b, _ in blocks):
            raise CurationError("split_by=bucket needs the knowledge block: set blocks.knowledge.enabled=true "
                                "(with its examples or model), or split_by=source")
        skipped: Counter[str] = Counter()
        on_bad = _on_bad_input(cfg.get("on_bad_input", "error"), skipped)
        current = work / "00-sources.jsonl"
        read_started = time.perf_counter()
        documents_in, tokens_in = _read(sources, counter, current, on_bad)
        read_seconds = time.perf_counter() - read_started
        logger.info("read %d documents, %d %s, in %.1f s", documents_in, tokens_in, counter.unit, read_seconds)
        stats = []
        for number, (block, applies) in enumerate(blocks, start=1):
            block.count_tokens = counter.count
            if isinstance(block, KLFilter):
                block.counter = counter
            following = work / f"{number:02d}-{block.name}.jsonl"
            stats.append(_run_block(block, applies, current, following, work / block.name, counter.unit,
                                    max_examples, example_chars))
            if not cfg.get("keep_work"):
                current.unlink()
            current = following
            if isinstance(block, Decontaminate):
                stats[-1].notes["list"] = str(block.write_list(out / "contaminated.jsonl"))
        files, totals, documents_out, tokens_out = _write_outputs(current, out, split_by)
        mix = _mix(totals, split_by, dict(cfg.get("mix_target") or LLAMA3_MIX)) if any(
            isinstance(b, KnowledgeClassifier) for b, _ in blocks) else {}
    finally:
        if not cfg.get("keep_work"):
            shutil.rmtree(work, ignore_errors=True)
    result = CurationResult(out, files, counter.unit, documents_in, tokens_in, documents_out, tokens_out, stats,
                            time.perf_counter() - started, read_seconds, mix, dict(skipped))
    result.report = write_report(result, out)
    return result


def _on_bad_input(mode: str, skipped: Counter[str]) -> Callable[[BadInputError], None]:
    if mode == "error":
        return raise_bad_input
    if mode != "skip":
        raise CurationError(f"on_bad_input must be 'error' or 'skip', got {mode!r}")

    def skip(err: BadInputError) -> None:
        skipped[err.reason] += 1
        if skipped.total() <= 10:
            logger.warning("skipped %s", err)
    return skip


def _read(sources: list[SourceInput], counter: TokenCounter, path: Path,
          on_bad: Callable[[BadInputError], None]) -> tuple[int, int]:
    """Every non-empty document of the sources into the first stage file, with its token count."""
    documents = tokens = 0
    with DocumentWriter(path) as writer:
        batch: list[Document] = []
        for doc in _nonempty(read_sources(sources, on_bad)):
            batch.append(doc)
            if len(batch) == 256:
                tokens += _write_counted(batch, counter, writer)
                documents += len(batch)
                batch = []
        tokens += _write_counted(batch, counter, writer)
        documents += len(batch)
    return documents, tokens


def _nonempty(documents: Iterator[Document]) -> Iterator[Document]:
    return (doc for doc in documents if doc.text.strip())


def _write_counted(batch: list[Document], counter: TokenCounter, writer: DocumentWriter) -> int:
    total = 0
    for doc, count in zip(batch, counter.count_batch([d.text for d in batch]), strict=True):
        doc.metadata["tokens"] = count
        total += count
        writer.write(doc)
    return total


def _run_block(block: Block, applies: Callable[[Document], bool], current: Path, following: Path, work: Path,
               unit: str, max_examples: int, example_chars: int) -> BlockStats:
    """Run one block from the stage file ``current`` to ``following``; documents it does not apply to pass."""
    stats = BlockStats(block.name, unit)
    started = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    logger.info("block %s ...", block.name)
    with DocumentWriter(following) as writer:
        for doc in read_documents(current, lambda d: not applies(d)):
            writer.write(doc)
        for verdict in block.run(lambda: read_documents(current, applies), work):
            stats.add(verdict, max_examples, example_chars)
            if verdict.kept is not None:
                writer.write(verdict.kept)
    shutil.rmtree(work, ignore_errors=True)
    stats.seconds = time.perf_counter() - started
    stats.notes = dict(block.notes)
    logger.info("block %s: %d of %d documents removed, %d changed (%.1f s)", block.name, stats.removed_documents,
                stats.documents_in, stats.changed_documents, stats.seconds)
    return stats


def _write_outputs(current: Path, out: Path, split_by: str
                   ) -> tuple[dict[str, Path], dict[str, Counter], int, int]:
    """The last stage as one jsonl per source or bucket; returns files, tokens[source][bucket], totals."""
    writers: dict[str, Any] = {}
    files: dict[str, Path] = {}
    totals: dict[str, Counter] = {}
    documents = tokens = 0
    try:
        for doc in read_documents(current):
            source = doc.metadata.get("source", "")
            name = str(doc.metadata.get("bucket", "unknown")) if split_by == "bucket" else source
            if name not in writers:
                files[name] = out / f"{name}.jsonl"
                writers[name] = open(out / f".{name}.jsonl.tmp", "w", encoding="utf-8")  # noqa: SIM115
            record = {"text": doc.text, "id": doc.id, "source": source,
                      **{key: doc.metadata[key] for key in _ANNOTATIONS if key in doc.metadata}}
            writers[name].write(json.dumps(record, ensure_ascii=False) + "\n")
            count = document_tokens(doc)
            totals.setdefault(source, Counter())[str(doc.metadata.get("bucket", ""))] += count
            documents += 1
            tokens += count
    finally:
        for writer in writers.values():
            writer.close()
    for name, path in files.items():
        (out / f".{name}.jsonl.tmp").replace(path)
    return files, totals, documents, tokens


def _mix(totals: dict[str, Counter], split_by: str, target: dict[str, float]) -> dict[str, Any]:
    """The data-mix weights that reach ``target`` from the output's bucket token counts."""
    by_bucket: Counter[str] = Counter()
    for buckets in totals.values():
        by_bucket.update(buckets)
    natural = natural_mix(dict(by_bucket))
    if split_by == "bucket":
        weights = bucket_weights(dict(by_bucket), target)
        reached = weights
    else:
        weights, reached = source_weights({s: dict(b) for s, b in totals.items()}, target)
    return {"target": target, "tokens_per_bucket": dict(by_bucket), "natural_mix": natural,
            "weights": weights, "reached_mix": reached, "split_by": split_by,
            "upsampling": {b: reached.get(b, 0) / natural[b] for b in natural if natural[b] > 0}}
