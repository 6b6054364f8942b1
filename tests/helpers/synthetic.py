"""Helpers for the tests: tiny corpora, synthetic prepared datasets and tokenizer folders."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from herd.data.manifest import FORMAT, write_manifest
from herd.data.shards import token_dtype, write_split
from herd.paths import repo_root

WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "it",
    "for",
    "on",
    "with",
    "as",
    "by",
    "at",
    "from",
    "this",
    "that",
    "value",
    "list",
    "dict",
    "return",
    "function",
    "class",
    "module",
    "import",
    "path",
    "file",
    "data",
    "token",
    "model",
    "train",
    "read",
    "write",
    "open",
    "close",
    "error",
    "raise",
    "none",
    "true",
    "false",
    "self",
    "args",
    "kwargs",
    "default",
    "option",
    "string",
    "number",
    "integer",
    "float",
    "byte",
    "line",
    "text",
    "word",
    "name",
    "key",
    "item",
    "index",
    "count",
    "size",
    "length",
    "start",
    "stop",
    "step",
]

# Synthetic datasets: token values encode (source, position), so every token is unique.
SYNTHETIC_VOCAB = 65536
SOURCE_OFFSET = 30000


def random_text(rng: random.Random, words: int) -> str:
    """Deterministic pseudo-English (with some code punctuation) for tiny corpora."""
    out = []
    for _ in range(words):
        word = rng.choice(WORDS)
        out.append(word + rng.choice(["", "", "", ",", ".", "()", ":\n    ", "\n"]))
    return " ".join(out)


def tiny_corpus(documents: int = 60, seed: int = 0) -> list[str]:
    """A small list of documents of varied length."""
    rng = random.Random(seed)
    return [random_text(rng, rng.randint(5, 120)) for _ in range(documents)]


def write_dataset(
    folder: Path,
    rows: dict[str, tuple[int, int]],
    row_len: int = 17,
    shard_rows: int = 4,
    seed: int = 0,
    fingerprint: str = "0" * 64,
) -> Path:
    """A prepared folder with synthetic sources: ``{name: (train_tokens, val_tokens)}``.

    Documents have random lengths (1..40 tokens); source ``k``'s tokens are
    ``k * SOURCE_OFFSET + 0, 1, 2, ...`` (train first, then val) and its padding token is
    ``(k + 1) * SOURCE_OFFSET - 1``, so any token identifies its source (and position).
    """
    rng = np.random.default_rng(seed)
    sources = {}
    for k, (name, counts) in enumerate(rows.items()):
        splits, start = {}, k * SOURCE_OFFSET
        for split, n in zip(("train", "val"), counts, strict=True):
            flat = np.arange(start, start + n, dtype=np.uint32)
            start += n
            lengths = _document_lengths(rng, n)
            ends = np.cumsum(lengths, dtype=np.int64)
            ids = np.arange(len(lengths), dtype=np.int64)
            splits[split] = write_split(
                folder, f"{name}/{split}", flat, ends, ids, row_len, pad_id=(k + 1) * SOURCE_OFFSET - 1,
                dtype=token_dtype(SYNTHETIC_VOCAB), max_rows=shard_rows, min_count=1,
            )  # fmt: skip
        sources[name] = {"inputs": ["synthetic"], "documents": 0, "empty_documents": 0, "splits": splits}
    manifest = {
        "format": FORMAT,
        "seq_len": row_len - 1,
        "row_len": row_len,
        "tokenizer": {"path": "tokenizer", "fingerprint": fingerprint, "vocab_size": SYNTHETIC_VOCAB},
        "sources": sources,
    }
    write_manifest(folder, manifest)
    return folder


def _document_lengths(rng: np.random.Generator, total: int) -> list[int]:
    lengths, left = [], total
    while left > 0:
        lengths.append(min(left, int(rng.integers(1, 41))))
        left -= lengths[-1]
    return lengths


def source_of(token: int) -> int:
    """Which synthetic source a token value belongs to."""
    return int(token) // SOURCE_OFFSET


def prepare_config(out, sources, **overrides):
    """herd.prepare's config for ``sources`` into ``out``: rows of 64 tokens, a quarter held out, one process."""
    cfg = OmegaConf.load(repo_root() / "configs" / "prepare.yaml")
    cfg.pop("hydra")
    cfg.merge_with({"output_dir": str(out), "seq_len": 64, "val_fraction": 0.25, "num_proc": 1, "progress": False,
                    "shards": {"max_rows": 16, "min_count": 2}, **overrides})
    cfg.sources = sources
    return cfg


def damage_first_media(folder: Path, source: str, suffix: str) -> dict:
    """Cut the first media member (``<key>.<suffix>``) of every shard of a media source to 30 bytes.

    The shards' checksums are dropped from the manifest, which is returned.
    """
    manifest = json.loads((folder / "manifest.json").read_text())
    for split in ("train", "val"):
        for shard in manifest["sources"][source]["splits"][split]["shards"]:
            path = folder / shard["path"]
            with tarfile.open(path) as tar:
                members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
            out = io.BytesIO()
            with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for member, data in members:
                    if member.name == f"{shard['first_row']:09d}.{suffix}":
                        data = data[:30]  # no longer decodes
                        member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
            path.write_bytes(out.getvalue())
            shard["sha256"] = None
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def write_word_level_tokenizer(folder, n_ids: int, config: dict | None = None):
    """A tokenizer folder of ``n_ids`` ids (the last two are bos/eos), with an optional tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True)
    vocab = {f"t{i}": i for i in range(n_ids - 2)} | {"<|begin_of_text|>": n_ids - 2, "<|end_of_text|>": n_ids - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok
