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
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
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
from herd.data.sources import Document, iter_documents
from herd.data.tokenizer import Tokenizer, train_tokenizer
from herd.paths import repo_root, resolve

logger = logging.getLogger(__name__)

_SOURCE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_BATCH_CHARS = 1 << 18  # text per task sent to a tokenizer process
_BATCH_DOCS = 1024


@dataclass(frozen=True)
class SourceSpec:
    """One named source: its inputs and how to read them."""

    name: str
    inputs: list[str]
    text_field: str = "text"
    glob: str = "**/*"

    def documents(self) -> Iterator[Document]:
        """The source's documents in order."""
        return iter_documents(self.inputs, self.text_field, self.glob)


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


def prepare(cfg: DictConfig | Mapping[str, Any]) -> Path:
    """Prepare shards as configured (see configs/prepare.yaml); returns the output folder."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    out = resolve(cfg.output_dir)
    sources = _source_specs(cfg.sources)
    seq_len = _positive_int(cfg, "seq_len")
    val_fraction = float(cfg.val_fraction)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    num_proc = int(cfg.num_proc) if cfg.get("num_proc") else _cores()
    started = time.perf_counter()

    tokenizer = _tokenizer(cfg.tokenizer, sources, val_fraction)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # a failed run must not leave a stale manifest
    tokenizer.save(out / "tokenizer")
    _remove_old_shards(out, sources)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=out, prefix=".prepare-")))
        progress = stack.enter_context(_progress(bool(cfg.get("progress", True))))
        pool = stack.enter_context(WorkerPool(tokenizer.to_json(), num_proc))
        stats = {}
        for spec in sources:
            buffers, counts = _tokenize(spec, tokenizer, pool, val_fraction, tmp, progress)
            counts["splits"] = {
                split: _write(out, spec.name, split, buffers[split], seq_len, tokenizer, cfg.shards, pool)
                for split in SPLITS
            }
            stats[spec.name] = counts
    manifest = _manifest(tokenizer, seq_len, val_fraction, sources, stats)
    path = write_manifest(out, manifest)
    _log_summary(stats, time.perf_counter() - started, path)
    return out


def _source_specs(sources: Mapping[str, Any]) -> list[SourceSpec]:
    if not sources:
        raise ValueError("prepare: no sources configured; set sources.<name>.input")
    specs = []
    for name, source in sources.items():
        if not _SOURCE_NAME.match(str(name)):
            raise ValueError(f"sources.{name}: a source name may only use letters, digits, '_' and '-'")
        if source is None or not source.get("input"):
            raise ValueError(f"sources.{name}.input is missing: give a file, folder, jsonl or 'stdlib:prose'")
        raw = source["input"]
        inputs = [raw] if isinstance(raw, str) else list(raw)
        inputs = [item if item.startswith("stdlib:") else str(resolve(item)) for item in map(str, inputs)]
        specs.append(
            SourceSpec(str(name), inputs, source.get("text_field", "text"), source.get("glob", "**/*"))
        )
    return specs


def _cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _positive_int(cfg: DictConfig, key: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return value


def _tokenizer(cfg: DictConfig, sources: list[SourceSpec], val_fraction: float) -> Tokenizer:
    """The configured tokenizer, or a new BPE trained on the train documents of all sources."""
    if cfg.get("path"):
        return Tokenizer.load(resolve(cfg.path))
    logger.info("training a byte-level BPE tokenizer of %d ids on the train documents", cfg.vocab_size)
    texts = (
        doc.text
        for spec in sources
        for doc in spec.documents()
        if doc.text.strip() and assign_split(doc.id, val_fraction) == "train"
    )
    return train_tokenizer(texts, int(cfg.vocab_size), int(cfg.get("min_frequency", 2)))


def assign_split(document_id: str, val_fraction: float) -> str:
    """``"val"`` for a fixed ~``val_fraction`` of document ids (by sha256), else ``"train"``."""
    digest = hashlib.sha256(document_id.encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") < val_fraction * 2**64 else "train"


def _tokenize(spec, tokenizer, pool, val_fraction, tmp, progress):
    """Tokenize one source into per-split buffers; returns (buffers, document counts)."""
    buffers = {split: _SplitBuffer(tmp / f"{spec.name}.{split}.bin") for split in SPLITS}
    counts = {"documents": 0, "empty_documents": 0, "tokens": 0}
    task = progress.add_task(f"tokenize {spec.name}", total=None)
    batches = _batches(spec.documents(), counts)
    for docs, encoded in pool.encode(batches, lambda batch: [doc.text for doc in batch]):
        for doc, token_ids in zip(docs, encoded, strict=True):
            tokens = with_boundaries(token_ids, tokenizer.bos_id, tokenizer.eos_id)
            buffers[assign_split(doc.id, val_fraction)].append(tokens, counts["documents"])
            counts["documents"] += 1
            counts["tokens"] += len(tokens)
        progress.update(task, advance=len(docs), description=_describe(spec.name, counts))
    for buffer in buffers.values():
        buffer.close()
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


def _write(out, source, split, buffer, seq_len, tokenizer, shard_cfg, pool) -> dict[str, Any]:
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
        max_rows=int(shard_cfg.max_rows),
        min_count=int(shard_cfg.min_count),
        map_fn=pool.imap,
    )


def _remove_old_shards(out: Path, sources: list[SourceSpec]) -> None:
    """Delete shards a previous run left for these sources (the manifest lists only new ones)."""
    for spec in sources:
        for old in (out / spec.name).glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
            old.unlink()


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


def _log_summary(stats: dict[str, Any], seconds: float, manifest: Path) -> None:
    total = sum(s["tokens"] for s in stats.values())
    for name, s in stats.items():
        logger.info(
            "%s: %d documents (%d empty skipped), %d tokens; train %d rows in %d shards, val %d rows in %d shards",
            name, s["documents"], s["empty_documents"], s["tokens"],
            s["splits"]["train"]["rows"], len(s["splits"]["train"]["shards"]),
            s["splits"]["val"]["rows"], len(s["splits"]["val"]["shards"]),
        )  # fmt: skip
    logger.info(
        "prepared %d tokens in %.1f s (%.0f tokens/s); manifest: %s",
        total,
        seconds,
        total / seconds,
        manifest,
    )


@hydra.main(config_path=str(repo_root() / "configs"), config_name="prepare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Command-line entry point: ``python -m herd.prepare [key=value ...]``."""
    prepare(cfg)


if __name__ == "__main__":
    main()
