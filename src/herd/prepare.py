"""herd.prepare: raw text to packed WebDataset shards.

    python -m herd.prepare                                   # the embedded stdlib corpus
    python -m herd.prepare output_dir=data/prepared/mine \\
        'sources={web: {input: /data/web.jsonl}, code: {input: /data/code/}}' \\
        tokenizer.path=/models/Llama-3.2-1B                  # a real Llama 3 tokenizer

Steps: read each source's documents (``herd.data.sources``); train a byte-level BPE on the
train documents unless ``tokenizer.path`` names one; tokenize with ``num_proc`` processes;
wrap each document in ``<|begin_of_text|> .. <|end_of_text|>``; assign it to ``val`` with
probability ``val_fraction`` by hashing its id; pack each source's split into rows of
``seq_len + 1`` tokens; write deterministic shards, the tokenizer and ``manifest.json``
(layout in ``herd.data.shards``). Empty documents are skipped and counted. Relative paths are
resolved against the repository root (``herd.paths``). The same inputs give byte-identical output.

Bad inputs (a file that is not UTF-8 or not text, a jsonl line that is not a JSON object with a
string text field; see ``herd.data.sources``) stop prepare with a message naming the file and
line, or, with ``on_bad_input=skip``, are skipped and counted per reason in the log and in the
manifest (``sources.<name>.skipped``).

The output is built in a hidden staging folder inside ``output_dir`` and moved into place only
when everything succeeded, the manifest last; a failed run leaves ``output_dir`` as it was (and
does not create it). What prepare owns in ``output_dir``, and replaces on success, is
``manifest.json``, ``tokenizer/`` and the ``<source>/<split>-NNNNNN.tar`` shards of the sources
it prepares; anything else there is left alone.

``python -m herd.prepare`` reports a bad config value or input as one line, ``herd: <message>``,
on stderr and exits with status 2.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from herd.data.packing import with_boundaries
from herd.data.parallel import WorkerPool
from herd.data.shards import FORMAT, MANIFEST_FILE, SPLITS, token_dtype, write_manifest, write_split
from herd.data.sources import BadInputError, Document, OnBadInput, iter_documents, raise_bad_input
from herd.data.tokenizer import CONFIG_FILE, TOKENIZER_FILE, Tokenizer, train_tokenizer
from herd.paths import repo_root, resolve

logger = logging.getLogger(__name__)

ON_BAD_INPUT = ("error", "skip")
_SOURCE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_SHARD_FILE = "*-[0-9][0-9][0-9][0-9][0-9][0-9].tar"
_REPLACED = ".replaced"  # in the staging folder: what the new output replaces, until it is in place
_BATCH_CHARS = 1 << 18  # text per task sent to a tokenizer process
_BATCH_DOCS = 1024
_LOGGED_BAD_INPUTS = 10  # skipped inputs logged one by one per source; later ones are only counted


class PrepareError(ValueError):
    """A configuration or input that herd.prepare cannot use; the message names it and the fix."""


@dataclass(frozen=True)
class SourceSpec:
    """One named source: its inputs and how to read them."""

    name: str
    inputs: list[str]
    text_field: str = "text"
    glob: str = "**/*"

    def documents(self, on_bad_input: OnBadInput = raise_bad_input) -> Iterator[Document]:
        """The source's documents in order; bad inputs go to ``on_bad_input`` (default: raise)."""
        return iter_documents(self.inputs, self.text_field, self.glob, on_bad_input)


class BadInputs:
    """What prepare does with one source's bad inputs: stop at the first, or skip and count them.

    ``mode`` is ``on_bad_input`` (``"error"`` or ``"skip"``); ``counts`` maps each reason
    (``herd.data.sources.BAD_INPUT_REASONS``) to the inputs skipped for it. With ``log=True``
    the first few skipped inputs are logged.
    """

    def __init__(self, mode: str, source: str, log: bool = True) -> None:
        self.mode = mode
        self.source = source
        self.log = log
        self.counts: Counter[str] = Counter()

    def __call__(self, error: BadInputError) -> None:
        if self.mode == "error":
            raise BadInputError(
                f"{error} (or set on_bad_input=skip to skip such inputs and count them)",
                error.reason,
                error.location,
            ) from None
        self.counts[error.reason] += 1
        skipped = self.counts.total()
        if self.log and skipped <= _LOGGED_BAD_INPUTS:
            last = skipped == _LOGGED_BAD_INPUTS
            more = "; further bad inputs of this source are only counted" if last else ""
            logger.warning("source %s: skipped a bad input: %s%s", self.source, error, more)


class _SplitBuffer:
    """A split's token stream, appended to a temporary file, with document boundaries."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ends: list[int] = []
        self.ids: list[int] = []
        self.total = 0
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()

    def append(self, tokens: np.ndarray, document_id: int) -> None:
        """Add one document's tokens (boundaries included)."""
        self._file.write(tokens.astype(np.uint32).tobytes())
        self.total += len(tokens)
        self.ends.append(self.total)
        self.ids.append(document_id)

    def close(self) -> None:
        """Finish writing; :meth:`tokens` may be called afterwards."""
        self._file.close()

    def tokens(self) -> np.ndarray:
        """The whole token stream (memory-mapped)."""
        if self.total == 0:
            return np.zeros(0, dtype=np.uint32)
        return np.memmap(self.path, dtype=np.uint32, mode="r", shape=(self.total,))


@dataclass(frozen=True)
class _Settings:
    """The checked configuration of one run."""

    out: Path
    sources: list[SourceSpec]
    seq_len: int
    val_fraction: float
    num_proc: int
    on_bad_input: str
    max_rows: int
    min_count: int


def prepare(cfg: DictConfig | Mapping[str, Any]) -> Path:
    """Prepare shards as configured (see configs/prepare.yaml); returns the output folder.

    Raises PrepareError (or BadInputError, FileNotFoundError) naming the bad value or input and
    the fix; after a failure ``output_dir`` is as it was before.
    """
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    settings = _settings(cfg)
    sources, seq_len, val_fraction = settings.sources, settings.seq_len, settings.val_fraction
    started = time.perf_counter()

    tokenizer = _tokenizer(cfg.get("tokenizer") or {}, sources, val_fraction, settings.on_bad_input)
    with _staging(settings.out) as staging, ExitStack() as stack:
        tokenizer.save(staging / "tokenizer")
        buffers_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=staging, prefix=".buffers-")))
        progress = stack.enter_context(_progress(bool(cfg.get("progress", True))))
        pool = stack.enter_context(WorkerPool(tokenizer.to_json(), settings.num_proc))
        stats = {}
        for spec in sources:
            buffers, counts = _tokenize(spec, tokenizer, pool, val_fraction, buffers_dir, progress,
                                        BadInputs(settings.on_bad_input, spec.name))  # fmt: skip
            counts["splits"] = {
                split: _write(staging, spec.name, split, buffers[split], seq_len, tokenizer, settings, pool)
                for split in SPLITS
            }
            stats[spec.name] = counts
        stack.close()  # the worker processes and the token buffers go before the output moves
        write_manifest(staging, _manifest(tokenizer, seq_len, val_fraction, sources, stats))
        _commit(staging, settings.out, [spec.name for spec in sources])
    _log_summary(stats, time.perf_counter() - started, settings.out / MANIFEST_FILE)
    return settings.out


def _settings(cfg: DictConfig) -> _Settings:
    """Every configured value checked, before anything is read or written."""
    if not cfg.get("output_dir"):
        raise PrepareError("output_dir is not set: give the folder to write the prepared data to")
    val_fraction = cfg.get("val_fraction", 0.02)
    number = isinstance(val_fraction, (int, float)) and not isinstance(val_fraction, bool)
    if not number or not 0 <= val_fraction < 1:
        raise PrepareError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    on_bad_input = cfg.get("on_bad_input", "error")
    if on_bad_input not in ON_BAD_INPUT:
        raise PrepareError(
            f"on_bad_input must be one of {ON_BAD_INPUT}, got {on_bad_input!r}: 'error' stops at the "
            "first file or jsonl line that is not text, 'skip' skips and counts them"
        )
    shards = cfg.get("shards") or {}
    return _Settings(
        out=resolve(str(cfg.output_dir)),
        sources=_source_specs(cfg.get("sources")),
        seq_len=_positive_int(cfg.get("seq_len"), "seq_len"),
        val_fraction=float(val_fraction),
        num_proc=_positive_int(cfg.num_proc, "num_proc") if cfg.get("num_proc") is not None else _cores(),
        on_bad_input=on_bad_input,
        max_rows=_positive_int(shards.get("max_rows", 2048), "shards.max_rows"),
        min_count=_positive_int(shards.get("min_count", 8), "shards.min_count"),
    )


def _source_specs(sources: Mapping[str, Any] | None) -> list[SourceSpec]:
    if not sources:
        raise PrepareError("prepare: no sources configured; set sources.<name>.input")
    specs = []
    for name, source in sources.items():
        if not _SOURCE_NAME.match(str(name)):
            raise PrepareError(f"sources.{name}: a source name may only use letters, digits, '_' and '-'")
        if not isinstance(source, Mapping) or not source.get("input"):
            raise PrepareError(
                f"sources.{name}.input is missing: give a file, folder, jsonl or 'stdlib:prose'"
            )
        raw = source["input"]
        inputs = [raw] if isinstance(raw, str) else list(raw)
        inputs = [item if item.startswith("stdlib:") else str(resolve(item)) for item in map(str, inputs)]
        text_field, glob = str(source.get("text_field", "text")), str(source.get("glob", "**/*"))
        specs.append(SourceSpec(str(name), inputs, text_field, glob))
    return specs


def _cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _positive_int(value: Any, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PrepareError(f"{key} must be a positive integer, got {value!r}")
    return value


def _tokenizer(
    cfg: DictConfig, sources: list[SourceSpec], val_fraction: float, on_bad_input: str
) -> Tokenizer:
    """The configured tokenizer, or a new BPE trained on the train documents of all sources.

    Bad inputs stop this pass (``on_bad_input=error``) or are skipped silently: the tokenize
    pass that follows meets them again, and counts them.
    """
    if cfg.get("path"):
        return _load_tokenizer(resolve(str(cfg.path)))
    vocab_size = _positive_int(cfg.get("vocab_size"), "tokenizer.vocab_size")
    min_frequency = _positive_int(cfg.get("min_frequency", 2), "tokenizer.min_frequency")
    logger.info("training a byte-level BPE tokenizer of %d ids on the train documents", vocab_size)
    bad = [BadInputs(on_bad_input, spec.name, log=False) for spec in sources]
    texts = (
        doc.text
        for spec, on_bad in zip(sources, bad, strict=True)
        for doc in spec.documents(on_bad)
        if doc.text.strip() and assign_split(doc.id, val_fraction) == "train"
    )
    try:
        return train_tokenizer(texts, vocab_size, min_frequency)
    except BadInputError:
        raise
    except ValueError as err:
        skipped = sum(b.counts.total() for b in bad)
        note = f" ({skipped} bad inputs were skipped)" if skipped else ""
        raise PrepareError(f"training the tokenizer: {err}{note}") from None


def _load_tokenizer(path: Path) -> Tokenizer:
    """``Tokenizer.load``, with a message naming the file for a file that is not a tokenizer."""
    file = path / TOKENIZER_FILE if path.is_dir() else path
    fix = (
        "Point tokenizer.path at the folder of a herd or Llama 3 tokenizer (it holds "
        f"{TOKENIZER_FILE}), or set tokenizer.path=null to train one."
    )
    for candidate in (file, file.parent / CONFIG_FILE):
        if candidate.is_file():
            try:
                json.loads(candidate.read_text(encoding="utf-8"))
            except ValueError as err:  # JSONDecodeError or UnicodeDecodeError
                raise PrepareError(f"tokenizer.path: {candidate} is not valid JSON ({err}). {fix}") from None
    try:
        return Tokenizer.load(path)
    except FileNotFoundError:
        raise
    except Exception as err:  # the tokenizers library raises plain Exception for a malformed tokenizer
        raise PrepareError(f"tokenizer.path: {file} is not a tokenizer herd can use ({err}). {fix}") from None


def assign_split(document_id: str, val_fraction: float) -> str:
    """``"val"`` for a fixed ~``val_fraction`` of document ids (by sha256), else ``"train"``."""
    digest = hashlib.sha256(document_id.encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") < val_fraction * 2**64 else "train"


def _tokenize(spec, tokenizer, pool, val_fraction, tmp, progress, bad_inputs: BadInputs):
    """Tokenize one source into per-split buffers; returns (buffers, document and skip counts)."""
    buffers = {split: _SplitBuffer(tmp / f"{spec.name}.{split}.bin") for split in SPLITS}
    counts: dict[str, Any] = {"documents": 0, "empty_documents": 0, "tokens": 0}
    task = progress.add_task(f"tokenize {spec.name}", total=None)
    batches = _batches(spec.documents(bad_inputs), counts)
    for docs, encoded in pool.encode(batches, lambda batch: [doc.text for doc in batch]):
        for doc, token_ids in zip(docs, encoded, strict=True):
            tokens = with_boundaries(token_ids, tokenizer.bos_id, tokenizer.eos_id)
            buffers[assign_split(doc.id, val_fraction)].append(tokens, counts["documents"])
            counts["documents"] += 1
            counts["tokens"] += len(tokens)
        progress.update(task, advance=len(docs), description=_describe(spec.name, counts))
    for buffer in buffers.values():
        buffer.close()
    counts["skipped"] = dict(sorted(bad_inputs.counts.items()))
    if counts["documents"] == 0 and bad_inputs.counts:
        raise PrepareError(
            f"source {spec.name}: every input was skipped as bad ({_reasons(counts['skipped'])}); "
            f"check sources.{spec.name}.input, glob and text_field"
        )
    return buffers, counts


def _batches(documents: Iterator[Document], counts: dict[str, int]) -> Iterator[list[Document]]:
    """Non-empty documents in batches of about _BATCH_CHARS; empty ones are counted."""
    batch: list[Document] = []
    chars = 0
    for doc in documents:
        if not doc.text.strip():
            counts["empty_documents"] += 1
            continue
        batch.append(doc)
        chars += len(doc.text)
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _describe(name: str, counts: dict[str, int]) -> str:
    return f"tokenize {name}: {counts['documents']:,} docs, {counts['tokens']:,} tokens"


def _write(out, source, split, buffer, seq_len, tokenizer, settings: _Settings, pool) -> dict[str, Any]:
    """Pack one split's buffer into shards (in the worker processes); returns its manifest entry."""
    return write_split(
        out,
        f"{source}/{split}",
        buffer.tokens(),
        np.asarray(buffer.ends, np.int64),
        np.asarray(buffer.ids, np.int64),
        row_len=seq_len + 1,
        pad_id=tokenizer.eos_id,
        dtype=token_dtype(tokenizer.vocab_size),
        max_rows=settings.max_rows,
        min_count=settings.min_count,
        map_fn=pool.imap,
    )


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A hidden folder inside ``out`` to build the output in; removed when the block ends.

    If the block fails, ``out`` (and any parent folder) is removed again when this run created it.
    """
    created = [folder for folder in (out, *out.parents) if not folder.exists()]
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".prepare-"))
    try:
        yield staging
    except BaseException:
        if (staging / _REPLACED).exists():  # _commit could not put the previous output back
            logger.error("the previous content of %s is kept in %s", out, staging / _REPLACED)
            raise
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # deepest first; only folders left empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    shutil.rmtree(staging, ignore_errors=True)


def _commit(staging: Path, out: Path, sources: list[str]) -> None:
    """Move the new output from ``staging`` into ``out``, replacing what prepare owns there.

    What an earlier run left (manifest, tokenizer folder, these sources' shards) is first moved
    into the staging folder, to be deleted with it; the manifest is removed first and written
    last. If a move fails, every move is undone, so ``out`` is left as it was.
    """
    replaced = staging / _REPLACED
    old = [out / MANIFEST_FILE, out / "tokenizer"]
    old += [path for name in sources for path in sorted((out / name).glob(_SHARD_FILE))]
    new = [staging / "tokenizer"]
    new += [path for name in sources for path in sorted((staging / name).glob("*.tar"))]
    moves: list[tuple[Path, Path]] = []
    made: list[Path] = []

    def move(source: Path, target: Path) -> None:
        for folder in reversed([target.parent, *target.parent.parents]):
            if not folder.exists():
                folder.mkdir()
                made.append(folder)
        os.replace(source, target)
        moves.append((source, target))

    try:
        for path in old:
            if path.exists() or path.is_symlink():
                move(path, replaced / path.relative_to(out))
        for path in new:
            move(path, out / path.relative_to(staging))
        move(staging / MANIFEST_FILE, out / MANIFEST_FILE)
    except BaseException:
        for source, target in reversed(moves):
            os.replace(target, source)
        for folder in reversed(made):
            folder.rmdir()
        raise


def _manifest(tokenizer, seq_len, val_fraction, sources, stats) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "seq_len": seq_len,
        "row_len": seq_len + 1,
        "dtypes": {"tokens": token_dtype(tokenizer.vocab_size).name, "document_ids": "int32"},
        "padding": {"token_id": tokenizer.eos_id, "document_id": -1},
        "val_fraction": val_fraction,
        "tokenizer": {
            "path": "tokenizer",
            "fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size,
            "special_ids": tokenizer.special_ids,
        },
        "sources": {
            spec.name: {"inputs": spec.inputs, "text_field": spec.text_field, **stats[spec.name]}
            for spec in sources
        },
    }


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=False,
    )


def _reasons(skipped: Mapping[str, int]) -> str:
    return ", ".join(f"{reason}: {count}" for reason, count in skipped.items())


def _log_summary(stats: dict[str, Any], seconds: float, manifest: Path) -> None:
    total = sum(s["tokens"] for s in stats.values())
    for name, s in stats.items():
        bad = sum(s["skipped"].values())
        logger.info(
            "%s: %d documents (%d empty skipped), %d tokens; train %d rows in %d shards, val %d rows in %d shards",
            name, s["documents"], s["empty_documents"], s["tokens"],
            s["splits"]["train"]["rows"], len(s["splits"]["train"]["shards"]),
            s["splits"]["val"]["rows"], len(s["splits"]["val"]["shards"]),
        )  # fmt: skip
        if bad:
            logger.warning("%s: %d bad inputs skipped (%s)", name, bad, _reasons(s["skipped"]))
    logger.info(
        "prepared %d tokens in %.1f s (%.0f tokens/s); manifest: %s",
        total,
        seconds,
        total / seconds,
        manifest,
    )


@hydra.main(config_path=str(repo_root() / "configs"), config_name="prepare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Command-line entry point: ``python -m herd.prepare [key=value ...]``.

    A bad config value or input prints one line, ``herd: <message>``, and exits with status 2.
    """
    try:
        prepare(cfg)
    except (ValueError, OSError) as err:  # how herd's data path reports bad values and inputs
        print(f"herd: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
