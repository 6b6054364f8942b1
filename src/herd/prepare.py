"""herd.prepare: raw text, dialogs and preference rankings to packed WebDataset shards.

    python -m herd.prepare                                   # the embedded stdlib corpus
    python -m herd.prepare output_dir=data/prepared/mine \\
        'sources={web: {input: /data/web.jsonl}, code: {input: /data/code/}}' \\
        tokenizer.path=/models/Llama-3.2-1B                  # a real Llama 3 tokenizer
    python -m herd.prepare output_dir=data/prepared/sft \\
        'sources={sft: {input: stdlib:sft}}' tokenizer.path=data/prepared/stdlib/tokenizer
    python -m herd.prepare output_dir=data/prepared/preferences \\
        'sources={preferences: {input: stdlib:preferences}}' tokenizer.path=data/prepared/stdlib/tokenizer

Each source has a kind (``sources.<name>.kind``): ``text`` (the default; ``herd.data.kinds.text``),
``dialog`` (``herd.data.kinds.dialog``; the embedded ``stdlib:sft`` input is one), ``preference``
(``herd.data.kinds.preference``; the embedded ``stdlib:preferences`` input is one), ``image``
(``herd.data.kinds.image``; ``stdlib:shapes``) or ``audio`` (``herd.data.kinds.audio``; ``stdlib:speech``). This module only
orchestrates (``herd.data.kinds``): check the config; train a byte-level BPE on the train
examples unless ``tokenizer.path`` names one; let each source's kind read, validate, encode
(with ``num_proc`` processes for text), assign splits (``val`` with probability
``val_fraction``, by hashing the example's id or group), pack rows of ``seq_len + 1`` tokens
and write deterministic shards; then write the tokenizer and ``manifest.json`` (layout in
``herd.data.shards``). Relative paths are resolved against the repository root
(``herd.paths``). The same inputs give byte-identical output.

Bad inputs (a file that is not UTF-8 or not text, a jsonl line that is not a JSON object with a
string text field, or not a usable dialog or ranking; see ``herd.data.inputs``,
``herd.data.kinds.dialog`` and ``herd.data.kinds.preference``) stop prepare with a message naming the file
and line (``on_bad_input=error``, the default for text), or are skipped and counted per reason
in the log and in the manifest (``sources.<name>.skipped``; ``on_bad_input=skip``, the default
for dialogs and rankings). A source with more than ``max_bad_fraction`` of bad inputs (default:
no limit for text, 0.1 for dialogs and rankings), or with nothing but bad inputs, fails. A jsonl
line longer than ``max_line_bytes`` (8 MiB) is such a bad input (``too_long_line``), found before
it is decoded, parsed or tokenized, so a huge line costs a few times ``max_line_bytes`` of memory.

The output is built in a hidden staging folder inside ``output_dir`` and moved into place only
when everything succeeded, the manifest last; a failed run leaves ``output_dir`` as it was (and
does not create it). What prepare owns in ``output_dir``, and replaces on success, is
``manifest.json``, ``tokenizer/`` and the ``<source>/<split>-NNNNNN.tar`` shards of the sources
it prepares; anything else there is left alone.

``python -m herd.prepare`` reports a bad config value or input as one line, ``herd: <message>``,
on stderr and exits with status 2.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from herd.cli import user_errors
from herd.data.inputs import MAX_LINE_BYTES, BadInputError, line_limit
from herd.data.kinds import (
    ON_BAD_INPUT,
    BadInputs,
    Job,
    PrepareError,
    SourceSpec,
    assign_split,
    kind_of,
    reasons,
)
from herd.data.manifest import FORMAT, MANIFEST_FILE, write_manifest
from herd.data.parallel import WorkerPool
from herd.data.shards import token_dtype
from herd.data.tokenizer import CONFIG_FILE, TOKENIZER_FILE, Tokenizer, train_tokenizer
from herd.paths import repo_root, resolve

__all__ = ["PrepareError", "SourceSpec", "assign_split", "main", "prepare"]

logger = logging.getLogger(__name__)

_SOURCE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_SHARD_FILE = "*-[0-9][0-9][0-9][0-9][0-9][0-9].tar"
_REPLACED = ".replaced"  # in the staging folder: what the new output replaces, until it is in place
# Embedded inputs that give a source its kind by default (else it is text).
_INPUT_KINDS = {"stdlib:sft": "dialog", "stdlib:transcripts": "dialog", "stdlib:preferences": "preference", "stdlib:shapes": "image",
                "stdlib:speech": "audio"}
_COMMON_KEYS = ("input", "kind", "on_bad_input", "max_bad_fraction")


@dataclass(frozen=True)
class _Settings:
    """The checked configuration of one run."""

    out: Path
    sources: list[SourceSpec]
    seq_len: int
    val_fraction: float
    num_proc: int
    max_rows: int
    min_count: int
    max_line_bytes: int


def prepare(cfg: DictConfig | Mapping[str, Any]) -> Path:
    """Prepare shards as configured (see configs/prepare.yaml); returns the output folder.

    Raises PrepareError (or BadInputError, FileNotFoundError) naming the bad value or input and
    the fix; after a failure ``output_dir`` is as it was before.
    """
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    settings = _settings(cfg)
    sources, seq_len, val_fraction = settings.sources, settings.seq_len, settings.val_fraction
    started = time.perf_counter()

    with line_limit(settings.max_line_bytes):
        tokenizer = _tokenizer(cfg.get("tokenizer") or {}, sources, val_fraction)
    with _staging(settings.out) as staging, ExitStack() as stack, line_limit(settings.max_line_bytes):
        tokenizer.save(staging / "tokenizer")
        job = Job(
            tokenizer=tokenizer,
            pool=stack.enter_context(WorkerPool(tokenizer.to_json(), settings.num_proc)),
            seq_len=seq_len,
            val_fraction=val_fraction,
            out=staging,
            scratch=Path(stack.enter_context(tempfile.TemporaryDirectory(dir=staging, prefix=".buffers-"))),
            progress=stack.enter_context(_progress(bool(cfg.get("progress", True)))),
            max_rows=settings.max_rows,
            min_count=settings.min_count,
        )
        entries = {}
        for spec in sources:
            bad_inputs = BadInputs(spec.on_bad_input, spec.name, max_fraction=spec.max_bad_fraction)
            entries[spec.name] = kind_of(spec.kind).prepare(spec, job, bad_inputs)
        stack.close()  # the worker processes and the token buffers go before the output moves
        write_manifest(staging, _manifest(tokenizer, seq_len, val_fraction, entries))
        _commit(staging, settings.out, [spec.name for spec in sources])
    _log_summary(sources, entries, time.perf_counter() - started, settings.out / MANIFEST_FILE)
    return settings.out


def _settings(cfg: DictConfig) -> _Settings:
    """Every configured value checked, before anything is read or written."""
    if not cfg.get("output_dir"):
        raise PrepareError("output_dir is not set: give the folder to write the prepared data to")
    val_fraction = cfg.get("val_fraction", 0.02)
    number = isinstance(val_fraction, (int, float)) and not isinstance(val_fraction, bool)
    if not number or not 0 <= val_fraction < 1:
        raise PrepareError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    defaults = {key: cfg.get(key) for key in ("on_bad_input", "max_bad_fraction", "chat_template", "too_long")}
    shards = cfg.get("shards") or {}
    return _Settings(
        out=resolve(str(cfg.output_dir)),
        sources=_source_specs(cfg.get("sources"), defaults),
        seq_len=_positive_int(cfg.get("seq_len"), "seq_len"),
        val_fraction=float(val_fraction),
        num_proc=_positive_int(cfg.num_proc, "num_proc") if cfg.get("num_proc") is not None else _cores(),
        max_rows=_positive_int(shards.get("max_rows", 2048), "shards.max_rows"),
        min_count=_positive_int(shards.get("min_count", 8), "shards.min_count"),
        max_line_bytes=_positive_int(cfg.get("max_line_bytes", MAX_LINE_BYTES), "max_line_bytes"),
    )


def _source_specs(sources: Mapping[str, Any] | None, defaults: Mapping[str, Any]) -> list[SourceSpec]:
    """Each configured source checked; a source's own keys win over the top-level ``defaults``."""
    if not sources:
        raise PrepareError("prepare: no sources configured; set sources.<name>.input")
    specs = []
    for name, source in sources.items():
        if not _SOURCE_NAME.match(str(name)):
            raise PrepareError(f"sources.{name}: a source name may only use letters, digits, '_' and '-'")
        if not isinstance(source, Mapping) or not source.get("input"):
            raise PrepareError(
                f"sources.{name}.input is missing: give a file, folder, jsonl, 'stdlib:prose', 'stdlib:sft' "
                "or 'stdlib:preferences'"
            )
        raw = source["input"]
        inputs = [raw] if isinstance(raw, str) else list(raw)
        inputs = [item if item.startswith("stdlib:") else str(resolve(item)) for item in map(str, inputs)]
        kind = kind_of(str(source.get("kind") or _input_kind(str(name), inputs)))
        unknown = sorted(set(source) - set(_COMMON_KEYS) - set(kind.options))
        if unknown:
            raise PrepareError(
                f"sources.{name}: unknown key(s) {unknown} for a {kind.name} source; it takes "
                f"{sorted({*_COMMON_KEYS, *kind.options})}"
            )
        options = {key: source.get(key, defaults.get(key)) for key in kind.options}
        options = {key: default if options[key] is None else options[key] for key, default in kind.options.items()}
        spec = SourceSpec(
            name=str(name),
            kind=kind.name,
            inputs=inputs,
            options=options,
            on_bad_input=_on_bad_input(source.get("on_bad_input", defaults.get("on_bad_input")), kind.on_bad_input),
            max_bad_fraction=_fraction(source, defaults, kind.max_bad_fraction, str(name)),
        )
        kind.check(spec)
        specs.append(spec)
    return specs


def _input_kind(name: str, inputs: list[str]) -> str:
    """The kind a source's inputs imply: that of its embedded ``stdlib:`` inputs, else text."""
    kinds = sorted({_INPUT_KINDS[item] for item in (i.split("?")[0] for i in inputs) if item in _INPUT_KINDS})
    if len(kinds) > 1:
        raise PrepareError(
            f"sources.{name}: its inputs are of the kinds {kinds}; give each kind a source of its own"
        )
    return kinds[0] if kinds else "text"


def _on_bad_input(value: Any, default: str) -> str:
    if value is None:
        return default
    if value not in ON_BAD_INPUT:
        raise PrepareError(
            f"on_bad_input must be one of {ON_BAD_INPUT}, got {value!r}: 'error' stops at the "
            "first file or jsonl line that is not text, 'skip' skips and counts them"
        )
    return value


def _fraction(source: Mapping[str, Any], defaults: Mapping[str, Any], default: float | None, name: str) -> float | None:
    value = source.get("max_bad_fraction", defaults.get("max_bad_fraction"))
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
        raise PrepareError(
            f"max_bad_fraction (of source {name}) must be a number in [0, 1], got {value!r}: the largest "
            "share of a source's inputs that may be skipped as bad (1 = no limit)"
        )
    return float(value)


def _cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _positive_int(value: Any, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PrepareError(f"{key} must be a positive integer, got {value!r}")
    return value


def _tokenizer(cfg: DictConfig, sources: list[SourceSpec], val_fraction: float) -> Tokenizer:
    """The configured tokenizer, or a new BPE trained on the train examples of all sources.

    Bad inputs stop this pass (``on_bad_input=error``) or are skipped silently: the encoding
    pass that follows meets them again, and counts them.
    """
    if cfg.get("path"):
        return _load_tokenizer(resolve(str(cfg.path)))
    vocab_size = _positive_int(cfg.get("vocab_size"), "tokenizer.vocab_size")
    min_frequency = _positive_int(cfg.get("min_frequency", 2), "tokenizer.min_frequency")
    logger.info("training a byte-level BPE tokenizer of %d ids on the train documents", vocab_size)
    bad = [BadInputs(spec.on_bad_input, spec.name, log=False) for spec in sources]
    texts = (
        text
        for spec, on_bad in zip(sources, bad, strict=True)
        for text in kind_of(spec.kind).texts(spec, val_fraction, on_bad)
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


def _manifest(tokenizer, seq_len, val_fraction, entries: dict[str, Any]) -> dict[str, Any]:
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
        "sources": entries,
    }


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=False,
    )


def _log_summary(sources: list[SourceSpec], entries: dict[str, Any], seconds: float, manifest: Path) -> None:
    total = sum(entry["tokens"] for entry in entries.values())
    for spec in sources:
        entry = entries[spec.name]
        logger.info("%s", kind_of(spec.kind).summary(spec.name, entry))
        bad = sum(entry["skipped"].values())
        if bad:
            logger.warning("%s: %d bad inputs skipped (%s)", spec.name, bad, reasons(entry["skipped"]))
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
    # ValueError and OSError: how herd's data path reports bad values and inputs
    with user_errors("herd.prepare", (ValueError, OSError), prefix="herd"):
        prepare(cfg)


if __name__ == "__main__":
    main()
