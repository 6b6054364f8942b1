"""WebDataset shards of packed rows, and the manifest that describes them.

A prepared folder looks like::

    manifest.json                 tokenizer, seq_len, counts, shard lists (see Manifest)
    tokenizer/                    tokenizer.json + tokenizer_config.json
    <source>/train-000000.tar     WebDataset shards, one sample per packed row:
    <source>/val-000000.tar         <row>.tokens.npy        (row_len,) uint16 or uint32
                                    <row>.document_ids.npy  (row_len,) int32, -1 = padding
                                    <row>.loss_mask.npy     (row_len,) uint8, 1 = trained on
                                                            (dialog and preference sources)
                                    <row>.response_ids.npy  (row_len,) int16, preference sources:
                                                            0 = prompt or padding, k = the k-th
                                                            response of its ranking in the row
                                    <row>.ranks.npy         (row_len,) int16, preference sources:
                                                            the response's rank, -1 elsewhere

``<row>`` is the row's index in its packed split, zero-padded to 9 digits. Tar headers are fixed
(mtime 0, uid/gid 0, no user names, mode 644), so the same inputs give byte-identical shards.

Each source's entry in the manifest names its ``kind`` (``text``, ``dialog`` or ``preference``)
and its row ``layout`` (:data:`LAYOUTS`): the members of every row and how examples were packed.
A manifest without them (written before dialogs existed) holds text sources. Members beyond
tokens, document ids and the loss mask are *extras*, per-token integers described by
:data:`herd.data.packing.EXTRA_MEMBERS` (dtype, smallest valid value, padding value).

Reading decodes only those members, with ``numpy.load(allow_pickle=False)``; nothing is ever
unpickled. Each shard is read whole and checked against the manifest (sha256, row count, row
indices, members, shapes, dtypes, token, mask and extras range) before any of its rows is used, so a
damaged shard never reaches training: it raises :class:`ShardError` naming the shard, or is
skipped when the reader is configured to.

Locations listed in a manifest never run code: they must be plain paths (relative to the
manifest's folder, or absolute) or URLs with a scheme in :data:`MANIFEST_URL_SCHEMES`.
``pipe:`` commands are accepted only where the user writes them in the config (``data_dir``,
explicit shard lists), never from a file herd reads.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from herd.data.packing import EXTRA_MEMBERS, PackedRows, num_rows, pack_range
from herd.paths import url_scheme

MANIFEST_FILE = "manifest.json"
FORMAT = "herd-packed-v1"
SPLITS = ("train", "val")
_TOKENS, _DOCS, _LOSS = "tokens.npy", "document_ids.npy", "loss_mask.npy"

# Row layouts by kind of source (manifest: sources.<name>.kind and .layout). "stream": documents
# are concatenated and cut into rows (a document may continue in the next row); "whole": each
# example sits whole in one row, and the row's tail is padding.
LAYOUTS: dict[str, dict[str, Any]] = {
    "text": {"members": ["tokens", "document_ids"], "packing": "stream"},
    "dialog": {"members": ["tokens", "document_ids", "loss_mask"], "packing": "whole"},
    "preference": {
        "members": ["tokens", "document_ids", "loss_mask", "response_ids", "ranks"],
        "packing": "whole",
    },
    # one image-caption example per sample, read by herd.data.image_loader (see herd.data.images)
    "image": {"members": ["tokens", "loss_mask", "image", "json"], "packing": "example"},
    # one audio-transcript example per sample, read by herd.data.speech_loader (see herd.data.audio)
    "audio": {"members": ["tokens", "loss_mask", "audio", "json"], "packing": "example"},
}
# Members every layout has, or may have, besides its extras (EXTRA_MEMBERS).
_BASE_MEMBERS = ("tokens", "document_ids", "loss_mask")

# URL schemes a manifest may name for its shards and tokenizer. Others are refused: ``pipe:``
# would run the listed text as a shell command.
MANIFEST_URL_SCHEMES = ("file", "s3", "gs", "http", "https")
# Characters a relative location may use when it is appended to a ``pipe:`` manifest location
# (one the user wrote): nothing the shell would interpret.
_SHELL_SAFE = re.compile(r"[A-Za-z0-9._/+=@,-]+")


class ShardError(RuntimeError):
    """A shard is missing, corrupt, truncated, or disagrees with its manifest."""


class ManifestError(ValueError):
    """A manifest is missing, malformed, or does not fit the model."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard as listed in a manifest: where it is and what it must contain."""

    url: str
    rows: int
    first_row: int
    sha256: str | None = None


# --- writing ------------------------------------------------------------------------------------


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype for token ids below ``vocab_size``."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def shard_bytes(rows: PackedRows, first_row: int, dtype: np.dtype) -> bytes:
    """A deterministic tar holding ``rows`` as WebDataset samples ``first_row``, ``first_row+1``...

    The bytes are those ``tarfile`` writes in USTAR format, built member by member with
    ``TarInfo.tobuf`` (``addfile`` costs more than tokenizing); every npy member of a shard
    shares one header, computed once. Rows with a loss mask get a third member, ``loss_mask``,
    and each of their extras a member of its name after it (``response_ids.npy``, ...), stored in
    the extra's dtype (:data:`herd.data.packing.EXTRA_MEMBERS`).
    """
    tokens, docs = rows.tokens.astype(dtype), rows.document_ids.astype(np.int32)
    masks = None if rows.loss_mask is None else rows.loss_mask.astype(np.uint8)
    extras = {f"{name}.npy": values.astype(EXTRA_MEMBERS[name].dtype) for name, values in rows.extras.items()}
    parts: list[bytes] = []
    if len(tokens):
        token_header, doc_header = _npy_header(tokens[0]), _npy_header(docs[0])
        mask_header = b"" if masks is None else _npy_header(masks[0])
        extra_headers = {member: _npy_header(values[0]) for member, values in extras.items()}
    for i in range(len(tokens)):
        key = f"{first_row + i:09d}"
        parts += _member(f"{key}.{_TOKENS}", token_header + tokens[i].tobytes())
        parts += _member(f"{key}.{_DOCS}", doc_header + docs[i].tobytes())
        if masks is not None:
            parts += _member(f"{key}.{_LOSS}", mask_header + masks[i].tobytes())
        for member, values in extras.items():
            parts += _member(f"{key}.{member}", extra_headers[member] + values[i].tobytes())
    parts.append(tarfile.NUL * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
    size = sum(map(len, parts))
    parts.append(tarfile.NUL * (-size % tarfile.RECORDSIZE))  # pad the last record, as tarfile does
    return b"".join(parts)


def write_shard(path: Path, rows: PackedRows, first_row: int, dtype: np.dtype) -> str:
    """Write a shard atomically; returns its sha256."""
    data = shard_bytes(rows, first_row, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)
    return hashlib.sha256(data).hexdigest()


def _npy_header(row: np.ndarray) -> bytes:
    """The .npy header for arrays shaped and typed like ``row``."""
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(row), allow_pickle=False)
    return out.getvalue()[: -row.nbytes or None]


def _member(name: str, data: bytes) -> list[bytes]:
    """Header, data and padding of one tar member (fixed mtime, owner and mode)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    return [header, data, tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE)]


def write_split(
    folder: Path,
    prefix: str,
    flat: np.ndarray,
    document_ends: np.ndarray,
    document_ids: np.ndarray,
    row_len: int,
    pad_id: int,
    dtype: np.dtype,
    max_rows: int = 2048,
    min_count: int = 8,
    map_fn: Callable[[Callable, Iterable], Iterable] = map,
    loss_mask: np.ndarray | None = None,
    extras: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Pack a split's token stream into rows and write it as ``<prefix>-000000.tar``, ...

    Uses at most ``max_rows`` rows per shard and at least ``min_count`` shards when there are
    enough rows. ``map_fn`` runs the per-shard work (e.g. ``WorkerPool.imap``, in processes).
    Spans whose document id is negative are padding inside the stream (whole-example rows lay
    out their padding so); ``loss_mask`` (parallel to ``flat``) is written as each row's
    ``loss_mask`` member, and each of ``extras`` (name -> array parallel to ``flat``) as the
    member of its name. Returns the split's manifest entry (counts and the shard list): the
    counts are of real tokens and documents, padding apart, plus ``trained_tokens`` with a mask.
    """
    rows = num_rows(flat.size, row_len)
    per_shard = max(1, min(max_rows, -(-rows // min_count)))
    tasks = (
        _ShardTask.cut(folder / f"{prefix}-{index:06d}.tar", flat, document_ends, document_ids, first,
                       min(rows, first + per_shard), row_len, pad_id, dtype, loss_mask, extras)
        for index, first in enumerate(range(0, rows, per_shard))
    )  # fmt: skip
    shards = [
        {"path": f"{prefix}-{i:06d}.tar", "rows": n, "first_row": first, "sha256": digest}
        for i, (first, n, digest) in enumerate(map_fn(_write_task, tasks))
    ]
    real = np.asarray(document_ids) >= 0
    lengths = np.diff(document_ends, prepend=0)
    tokens = int(lengths[real].sum()) if not real.all() else int(flat.size)
    entry = {
        "documents": int(real.sum()),
        "tokens": tokens,
        "rows": rows,
        "padding_tokens": rows * row_len - tokens,
        "unigram_entropy": unigram_entropy(flat if real.all() else flat[np.repeat(real, lengths)]),
        "shards": shards,
    }
    if loss_mask is not None:
        entry["trained_tokens"] = int(np.count_nonzero(loss_mask))
    return entry


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats per token) of the token frequencies: the loss of the best context-free model."""
    counts = np.bincount(tokens.astype(np.int64, copy=False))
    p = counts[counts > 0] / max(1, tokens.size)
    return float(-(p * np.log(p)).sum())


@dataclass(frozen=True)
class _ShardTask:
    """Everything one shard needs, and nothing more (it may travel to a worker process)."""

    path: Path
    tokens: np.ndarray  # the shard's slice of the split's token stream
    document_ends: np.ndarray  # ends of the documents overlapping it, relative to the slice
    document_ids: np.ndarray
    first_row: int
    rows: int
    row_len: int
    pad_id: int
    dtype: np.dtype
    loss_mask: np.ndarray | None = None  # the shard's slice of the split's loss mask
    extras: dict[str, np.ndarray] | None = None  # the shard's slices of the split's extras

    @classmethod
    def cut(
        cls, path, flat, ends, ids, first, end, row_len, pad_id, dtype, loss_mask=None, extras=None
    ) -> _ShardTask:
        """The task for rows ``first .. end-1`` of the split ``flat``."""
        start, stop = first * row_len, min(end * row_len, flat.size)
        lo, hi = np.searchsorted(ends, [start, stop - 1], side="right")
        mask = None if loss_mask is None else np.array(loss_mask[start:stop])
        extra = {name: np.array(values[start:stop]) for name, values in (extras or {}).items()}
        return cls(path, np.array(flat[start:stop]), ends[lo : hi + 1] - start, ids[lo : hi + 1],
                   first, end - first, row_len, pad_id, dtype, mask, extra)  # fmt: skip


def _write_task(task: _ShardTask) -> tuple[int, int, str]:
    """Pack and write one shard; returns (first row, rows, sha256)."""
    packed = pack_range(
        task.tokens, task.document_ends, task.document_ids, task.row_len, task.pad_id, 0, task.rows,
        task.loss_mask, task.extras,
    )
    return task.first_row, task.rows, write_shard(task.path, packed, task.first_row, task.dtype)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` (sorted keys, so identical content gives identical bytes)."""
    path = folder / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


# --- the manifest -------------------------------------------------------------------------------


class Manifest:
    """A prepared dataset's ``manifest.json``: tokenizer, row length, sources and their shards.

    ``location`` is a prepared folder, a manifest file, or a URL of either (the user's choice, so
    it may be a ``pipe:`` command). Shard and tokenizer paths in the manifest are relative to the
    manifest's folder, absolute, or URLs with a scheme in :data:`MANIFEST_URL_SCHEMES`; every one
    is checked when the manifest is loaded, and anything else raises :class:`ManifestError`.
    """

    def __init__(self, data: dict[str, Any], location: str) -> None:
        self.data = data
        self.location = location
        self.base = location.rsplit("/", 1)[0] if "/" in location else "."
        if not isinstance(data, dict):
            raise ManifestError(f"{location}: not a herd manifest (not a JSON object); re-run herd.prepare")
        for key in ("format", "row_len", "tokenizer", "sources"):
            if key not in data:
                raise ManifestError(f"{location}: not a herd manifest (no {key!r}); re-run herd.prepare")
        if data["format"] != FORMAT:
            raise ManifestError(
                f"{location}: format {data['format']!r} is not {FORMAT!r}; re-run herd.prepare"
            )
        self._check_locations()

    @classmethod
    def load(cls, location: str | os.PathLike[str]) -> Manifest:
        """Read a manifest from a prepared folder, a manifest path or a URL."""
        location = str(location)
        if not location.endswith(".json"):
            location = location.rstrip("/") + "/" + MANIFEST_FILE
        try:
            with wds.gopen(location, "rb") as stream:
                data = json.loads(stream.read())
        except FileNotFoundError:
            raise ManifestError(
                f"manifest not found: {location}. Prepare the data first (python -m herd.prepare) "
                "or point data_dir at a prepared folder."
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ManifestError(
                f"manifest {location} is not valid JSON ({err}); re-run herd.prepare"
            ) from None
        return cls(data, location)

    @property
    def row_len(self) -> int:
        """Tokens per stored row (seq_len + 1)."""
        return int(self.data["row_len"])

    def source_kind(self, source: str) -> str:
        """The kind of examples ``source`` holds: ``"text"`` (the default), ``"dialog"``, ``"preference"``."""
        self._check_source(source)
        kind = self.data["sources"][source].get("kind", "text")
        if kind not in LAYOUTS:
            raise ManifestError(
                f"source {source!r} in {self.location} is of kind {kind!r}; herd reads packed rows of the "
                f"kinds {sorted(LAYOUTS)} (re-run herd.prepare with a herd that knows it, or leave the source out)"
            )
        return kind

    def layout(self, source: str) -> dict[str, Any]:
        """The row layout of ``source`` (an entry of :data:`LAYOUTS`): its members and packing."""
        layout = self.data["sources"][source].get("layout") if self.source_kind(source) else None
        if layout is None:
            return LAYOUTS[self.source_kind(source)]
        if not isinstance(layout, dict) or not isinstance(layout.get("members"), list):
            raise ManifestError(f"{self.location}: sources.{source}.layout is malformed; re-run herd.prepare")
        return layout

    def has_loss_mask(self, source: str) -> bool:
        """True when the rows of ``source`` carry a ``loss_mask`` member (dialog and preference sources)."""
        return "loss_mask" in self.layout(source)["members"]

    def extras(self, source: str) -> tuple[str, ...]:
        """The extra members of the rows of ``source`` (``("response_ids", "ranks")`` for preferences).

        Raises ManifestError for a member herd does not know.
        """
        extras = tuple(m for m in self.layout(source)["members"] if m not in _BASE_MEMBERS)
        unknown = [m for m in extras if m not in EXTRA_MEMBERS]
        if unknown:
            raise ManifestError(
                f"{self.location}: sources.{source}.layout names the member(s) {unknown}, which herd does "
                f"not know (it knows {[*_BASE_MEMBERS, *EXTRA_MEMBERS]}); re-run herd.prepare with this herd"
            )
        return extras

    def whole_examples(self, source: str) -> bool:
        """True when each example of ``source`` sits whole in one row (it must be read at row_len)."""
        return self.layout(source).get("packing") == "whole"

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer the shards were made with."""
        return int(self.data["tokenizer"]["vocab_size"])

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the tokenizer the shards were made with."""
        return str(self.data["tokenizer"]["fingerprint"])

    @property
    def tokenizer_location(self) -> str:
        """Where the tokenizer folder saved with the shards is."""
        return self._resolve(self.data["tokenizer"]["path"], "tokenizer.path")

    def source_names(self) -> list[str]:
        """Names of the sources in this dataset."""
        return list(self.data["sources"])

    def _check_source(self, source: str) -> None:
        if source not in self.data["sources"]:
            raise ManifestError(
                f"source {source!r} is not in manifest {self.location} (it has {self.source_names()})"
            )

    def shards(self, source: str, split: str) -> list[ShardInfo]:
        """The shards of ``source``'s ``split``, with locations resolved."""
        self._check_source(source)
        listed = self.data["sources"][source]["splits"].get(split, {}).get("shards", [])
        entry = f"sources.{source}.splits.{split}.shards"
        return [
            ShardInfo(self._resolve(s["path"], f"{entry}[{i}].path"), int(s["rows"]), int(s["first_row"]),
                      s.get("sha256"))
            for i, s in enumerate(listed)
        ]  # fmt: skip

    def check_tokenizer(
        self, expected_vocab_size: int | None, expected_fingerprint: str | None = None
    ) -> None:
        """Refuse shards made with another tokenizer than the model expects."""
        if expected_vocab_size is not None and int(expected_vocab_size) != self.vocab_size:
            raise ManifestError(
                f"vocab size mismatch: the model expects {expected_vocab_size} but the shards in "
                f"{self.location} were made with a tokenizer of {self.vocab_size}. Prepare the data "
                "with the model's tokenizer, or set the model's vocab_size to match."
            )
        if expected_fingerprint is not None and expected_fingerprint != self.fingerprint:
            raise ManifestError(
                f"tokenizer fingerprint mismatch: the model expects {expected_fingerprint} but the "
                f"shards in {self.location} were made with {self.fingerprint}. Prepare the data "
                "with the model's tokenizer."
            )

    def _check_locations(self) -> None:
        """Refuse the manifest if any shard or tokenizer location it lists could run code."""
        tokenizer, sources = self.data["tokenizer"], self.data["sources"]
        if not isinstance(tokenizer, dict) or not isinstance(sources, dict):
            raise ManifestError(
                f"{self.location}: 'tokenizer' and 'sources' must be objects; re-run herd.prepare"
            )
        self._resolve(tokenizer.get("path", "tokenizer"), "tokenizer.path")
        for name, source in sources.items():
            splits = source.get("splits", {}) if isinstance(source, dict) else None
            if not isinstance(splits, dict):
                raise ManifestError(f"{self.location}: sources.{name} is malformed; re-run herd.prepare")
            for split, entry in splits.items():
                shards = entry.get("shards", []) if isinstance(entry, dict) else None
                if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
                    where = f"sources.{name}.splits.{split}.shards"
                    raise ManifestError(f"{self.location}: {where} is malformed; re-run herd.prepare")
                for i, shard in enumerate(shards):
                    self._resolve(shard.get("path"), f"sources.{name}.splits.{split}.shards[{i}].path")

    def _resolve(self, path: Any, entry: str) -> str:
        """A location listed at ``entry`` of the manifest, resolved against the manifest's folder.

        Plain paths (relative or absolute) and URLs with a scheme in :data:`MANIFEST_URL_SCHEMES`
        pass; anything else (``pipe:`` above all) raises ManifestError naming the entry.
        """
        if not isinstance(path, str) or not path or "\x00" in path:
            self._refuse(path, entry, "it is not a path")
        scheme = url_scheme(path)
        if scheme:
            if scheme not in MANIFEST_URL_SCHEMES:
                self._refuse(path, entry, f"the scheme {scheme!r} is not allowed")
            return path
        if Path(path).is_absolute():
            return path
        if url_scheme(self.base) == "pipe" and not _SHELL_SAFE.fullmatch(path):
            self._refuse(path, entry, "it would be appended to the pipe: command of data_dir, and it holds "
                         "characters the shell interprets")  # fmt: skip
        return f"{self.base}/{path}"

    def _refuse(self, path: Any, entry: str, why: str) -> None:
        raise ManifestError(
            f"manifest {self.location}: {entry} = {path!r} is refused ({why}). A manifest may list "
            "only plain file paths (relative to its folder, or absolute) and URLs with a scheme in "
            f"{', '.join(MANIFEST_URL_SCHEMES)}: a location read from a file never runs a command. Fix "
            "the manifest or re-run herd.prepare; to read shards through a command, write the pipe: "
            "location in your own config (data.data_dir, or data.sources.<name>.train / .val)."
        )


# --- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One stored row: its index in the packed split, token ids, document ids, loss mask, extras.

    ``loss_mask`` is a bool array for dialog and preference rows (true on the tokens to
    predict), else None. ``extras`` maps each extra member of the layout (``response_ids``,
    ``ranks``) to its stored array; it is empty for text and dialogs.
    """

    index: int
    tokens: np.ndarray
    document_ids: np.ndarray
    loss_mask: np.ndarray | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)


def read_shard(
    shard: ShardInfo, row_len: int, vocab_size: int, loss_mask: bool = False, extras: Sequence[str] = ()
) -> list[Row]:
    """All rows of ``shard``, checked against the manifest; raises ShardError naming the shard.

    ``loss_mask``: whether the source's layout has a ``loss_mask`` member (dialog and preference
    sources); ``extras``: the layout's extra members (:meth:`Manifest.extras`). A row must hold
    exactly the members its layout names; each extra is checked for shape, integer dtype and its
    smallest valid value (:data:`herd.data.packing.EXTRA_MEMBERS`). ``shard.url`` is opened with
    webdataset's ``gopen``, as given: a ``pipe:`` URL runs its command. :class:`Manifest` never
    yields one; only a location the user configured can be one.
    """
    unknown = [name for name in extras if name not in EXTRA_MEMBERS]
    if unknown:
        raise ValueError(f"read_shard: unknown extra member(s) {unknown}; known: {sorted(EXTRA_MEMBERS)}")
    data = _fetch(shard.url)
    if shard.sha256 is not None and hashlib.sha256(data).hexdigest() != shard.sha256:
        raise ShardError(
            f"shard {shard.url} is corrupt or truncated: its sha256 differs from the manifest's. "
            "Re-run herd.prepare or restore the file (or set on_corrupt_shard=skip to skip it)."
        )
    try:
        rows = [
            _decode(sample, row_len, vocab_size, loss_mask, tuple(extras))
            for sample in _samples(data, shard.url)
        ]
    except ShardError:
        raise
    except Exception as err:  # tarfile, numpy and webdataset raise many kinds on damaged bytes
        raise ShardError(f"shard {shard.url} is corrupt or truncated: {err}") from err
    expected = list(range(shard.first_row, shard.first_row + shard.rows))
    if [row.index for row in rows] != expected:
        raise ShardError(
            f"shard {shard.url} is truncated or altered: it holds {len(rows)} rows but the manifest "
            f"lists {shard.rows} (rows {shard.first_row}..{shard.first_row + shard.rows - 1})"
        )
    return rows


def _fetch(url: str) -> bytes:
    try:
        with wds.gopen(url, "rb") as stream:
            return stream.read()
    except FileNotFoundError:
        raise ShardError(
            f"shard not found: {url}. Re-run herd.prepare or fix data_dir/shard paths."
        ) from None


def _samples(data: bytes, url: str):
    """WebDataset samples (dicts of raw member bytes) of an in-memory tar."""
    files = tar_file_expander([{"url": url, "stream": io.BytesIO(data)}])
    return group_by_keys(files)


def _decode(
    sample: dict[str, Any],
    row_len: int,
    vocab_size: int,
    loss_mask: bool = False,
    extras: tuple[str, ...] = (),
) -> Row:
    """A Row from one sample's npy members; checks members, shapes, dtypes, token, mask and extras range."""
    key = sample["__key__"]
    members = (_TOKENS, _DOCS, _LOSS) if loss_mask else (_TOKENS, _DOCS)
    members += tuple(f"{name}.npy" for name in extras)
    missing = [name for name in members if name not in sample]
    if missing or not key.isdigit():
        raise ShardError(f"sample {key!r} in {sample['__url__']} is malformed (missing {missing})")
    if not loss_mask and _LOSS in sample:
        raise ShardError(
            f"sample {key} in {sample['__url__']} has a loss mask, but the manifest lists its source as "
            "text; re-run herd.prepare or fix the manifest"
        )
    unexpected = [name for name in EXTRA_MEMBERS if name not in extras and f"{name}.npy" in sample]
    if unexpected:
        raise ShardError(
            f"sample {key} in {sample['__url__']} has the member(s) {unexpected}, which the manifest's "
            "layout of its source does not list; re-run herd.prepare or fix the manifest"
        )
    tokens = _load_npy(sample[_TOKENS], key, sample["__url__"])
    docs = _load_npy(sample[_DOCS], key, sample["__url__"])
    if (
        tokens.shape != (row_len,)
        or docs.shape != (row_len,)
        or tokens.dtype.kind != "u"
        or docs.dtype.kind != "i"
    ):
        raise ShardError(
            f"sample {key} in {sample['__url__']}: expected {row_len} unsigned tokens and int document "
            f"ids, got {tokens.dtype}{tokens.shape} and {docs.dtype}{docs.shape}"
        )
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise ShardError(
            f"sample {key} in {sample['__url__']}: token id {int(tokens.max())} >= vocab size {vocab_size}"
        )
    mask = _decode_mask(sample, key, row_len) if loss_mask else None
    extra = {name: _decode_extra(sample, key, row_len, name) for name in extras}
    return Row(int(key), tokens, docs, mask, extra)


def _decode_mask(sample: dict[str, Any], key: str, row_len: int) -> np.ndarray:
    """The row's loss mask as bool: (row_len,) uint8 or bool holding only 0 and 1."""
    mask = _load_npy(sample[_LOSS], key, sample["__url__"])
    if mask.shape != (row_len,) or mask.dtype not in (np.uint8, np.bool_):
        raise ShardError(
            f"sample {key} in {sample['__url__']}: expected a loss mask of {row_len} uint8, got "
            f"{mask.dtype}{mask.shape}"
        )
    if mask.size and int(mask.max()) > 1:
        raise ShardError(f"sample {key} in {sample['__url__']}: loss mask values must be 0 or 1")
    return mask.astype(bool)


def _decode_extra(sample: dict[str, Any], key: str, row_len: int, name: str) -> np.ndarray:
    """The row's extra member ``name``: (row_len,) signed integers, none below the member's minimum."""
    values = _load_npy(sample[f"{name}.npy"], key, sample["__url__"])
    if values.shape != (row_len,) or values.dtype.kind != "i":
        raise ShardError(
            f"sample {key} in {sample['__url__']}: expected {name} of {row_len} signed integers, got "
            f"{values.dtype}{values.shape}"
        )
    minimum = EXTRA_MEMBERS[name].minimum
    if values.size and int(values.min()) < minimum:
        raise ShardError(
            f"sample {key} in {sample['__url__']}: {name} values must be >= {minimum}, "
            f"found {int(values.min())}"
        )
    return values


def _load_npy(data: bytes, key: str, url: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        raise ShardError(f"sample {key} in {url} is not a plain numpy array ({err})") from None
