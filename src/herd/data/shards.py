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
import os
import tarfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from herd.data.packing import EXTRA_MEMBERS, PackedRows, num_rows, pack_range

SPLITS = ("train", "val")
T = TypeVar("T")
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
    # one image-caption example per sample, read by herd.data.loaders.image (see herd.data.kinds.image)
    "image": {"members": ["tokens", "loss_mask", "image", "json"], "packing": "example"},
    # one audio-transcript example per sample, read by herd.data.loaders.audio (see herd.data.kinds.audio)
    "audio": {"members": ["tokens", "loss_mask", "audio", "json"], "packing": "example"},
}
# Members every layout has, or may have, besides its extras (EXTRA_MEMBERS).
BASE_MEMBERS = ("tokens", "document_ids", "loss_mask")



class ShardError(RuntimeError):
    """A shard is missing, corrupt, truncated, or disagrees with its manifest."""


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
        token_header, doc_header = npy_header(tokens[0]), npy_header(docs[0])
        mask_header = b"" if masks is None else npy_header(masks[0])
        extra_headers = {member: npy_header(values[0]) for member, values in extras.items()}
    for i in range(len(tokens)):
        key = f"{first_row + i:09d}"
        parts += tar_member(f"{key}.{_TOKENS}", token_header + tokens[i].tobytes())
        parts += tar_member(f"{key}.{_DOCS}", doc_header + docs[i].tobytes())
        if masks is not None:
            parts += tar_member(f"{key}.{_LOSS}", mask_header + masks[i].tobytes())
        for member, values in extras.items():
            parts += tar_member(f"{key}.{member}", extra_headers[member] + values[i].tobytes())
    return tar_bytes(parts)


def write_shard(path: Path, rows: PackedRows, first_row: int, dtype: np.dtype) -> str:
    """Write a shard atomically; returns its sha256."""
    return write_atomic(path, shard_bytes(rows, first_row, dtype))


def write_atomic(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` through a ``.partial`` file and a rename; returns its sha256.

    A reader never sees a half-written shard: a killed writer leaves only the ``.partial`` file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)
    return hashlib.sha256(data).hexdigest()


def tar_bytes(parts: list[bytes]) -> bytes:
    """The bytes of a tar holding the members ``parts`` (from :func:`tar_member`), closed as tarfile does."""
    parts = [*parts, tarfile.NUL * (2 * tarfile.BLOCKSIZE)]  # end-of-archive marker
    parts.append(tarfile.NUL * (-sum(map(len, parts)) % tarfile.RECORDSIZE))  # pad the last record
    return b"".join(parts)


def npy_header(row: np.ndarray) -> bytes:
    """The .npy header for arrays shaped and typed like ``row``."""
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(row), allow_pickle=False)
    return out.getvalue()[: -row.nbytes or None]


def tar_member(name: str, data: bytes) -> list[bytes]:
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
    return read_samples(shard, lambda sample: _decode(sample, row_len, vocab_size, loss_mask, tuple(extras)))


def read_samples(shard: ShardInfo, decode: Callable[[dict[str, Any]], T], what: str = "rows") -> list[T]:
    """Every sample of ``shard`` through ``decode``, checked against the manifest's entry.

    The shard is read whole; its sha256, and the ``index`` of each decoded sample against the
    manifest's row numbers, are checked before anything is returned. Whatever is wrong raises
    :class:`ShardError` naming the shard. Both layouts (packed rows, media examples) read here.
    """
    data = fetch_shard(shard.url)
    if shard.sha256 is not None and hashlib.sha256(data).hexdigest() != shard.sha256:
        raise ShardError(
            f"shard {shard.url} is corrupt or truncated: its sha256 differs from the manifest's. "
            "Re-run herd.prepare or restore the file (or set on_corrupt_shard=skip to skip it)."
        )
    try:
        rows = [decode(sample) for sample in shard_samples(data, shard.url)]
    except ShardError:
        raise
    except Exception as err:  # tarfile, numpy and webdataset raise many kinds on damaged bytes
        raise ShardError(f"shard {shard.url} is corrupt or truncated: {err}") from err
    expected = list(range(shard.first_row, shard.first_row + shard.rows))
    if [row.index for row in rows] != expected:
        raise ShardError(
            f"shard {shard.url} is truncated or altered: it holds {len(rows)} {what} but the manifest "
            f"lists {shard.rows} ({what} {shard.first_row}..{shard.first_row + shard.rows - 1})"
        )
    return rows


def fetch_shard(url: str) -> bytes:
    """The bytes of the shard at ``url`` (a path or a URL webdataset opens); ShardError if it is missing."""
    try:
        with wds.gopen(url, "rb") as stream:
            return stream.read()
    except FileNotFoundError:
        raise ShardError(
            f"shard not found: {url}. Re-run herd.prepare or fix data_dir/shard paths."
        ) from None


def shard_samples(data: bytes, url: str):
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
    tokens = load_npy(sample[_TOKENS], key, sample["__url__"])
    docs = load_npy(sample[_DOCS], key, sample["__url__"])
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
    mask = load_npy(sample[_LOSS], key, sample["__url__"])
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
    values = load_npy(sample[f"{name}.npy"], key, sample["__url__"])
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


def load_npy(data: bytes, key: str, url: str) -> np.ndarray:
    """A plain numpy array from npy bytes (never a pickle); ShardError names the sample otherwise."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        raise ShardError(f"sample {key} in {url} is not a plain numpy array ({err})") from None
