"""The kinds of examples ``herd.prepare`` turns into shards, and what every kind shares.

A kind (text, dialog, ...) is one module of ``herd.data`` that reads, validates and encodes its
examples and writes them in its row layout (``herd.data.shards.LAYOUTS``). The module provides
one :class:`Kind` object, registered by name in :data:`KINDS`; a source picks it with
``sources.<name>.kind`` (default ``text``). ``herd.prepare`` only orchestrates: it checks the
config, trains or loads the tokenizer, asks each source's kind to prepare it, and writes the
manifest. What every kind shares lives here:

- :class:`SourceSpec`: one configured source (its kind, inputs, options, bad-input policy);
- :class:`BadInputs`: stop at a bad input, or skip it and count it per reason, up to a limit;
- :func:`assign_split`: the split of an example, by a hash of its id (or of its group);
- :class:`Job`: the run's tokenizer, worker processes, row length, folders and shard writer;
- :class:`SplitBuffer`: a split's token stream (and loss mask, and extras) on disk, with its documents.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from herd.data.inputs import BadInputError
from herd.data.packing import EXTRA_MEMBERS
from herd.data.shards import LAYOUTS, SPLITS, token_dtype, write_split

if TYPE_CHECKING:
    from rich.progress import Progress

    from herd.data.parallel import WorkerPool
    from herd.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Kind name -> "module:object" of its Kind (imported when first used).
KINDS = {
    "text": "herd.data.kinds.text:TEXT",
    "dialog": "herd.data.kinds.dialog:DIALOG",
    "preference": "herd.data.kinds.preference:PREFERENCE",
    "image": "herd.data.kinds.image:IMAGE",
    "audio": "herd.data.kinds.audio:AUDIO",
}
ON_BAD_INPUT = ("error", "skip")
_LOGGED_BAD_INPUTS = 10  # skipped inputs logged one by one per source; later ones are only counted


class PrepareError(ValueError):
    """A configuration or input that herd.prepare cannot use; the message names it and the fix."""


@dataclass(frozen=True)
class SourceSpec:
    """One named source: its kind, inputs, kind-specific options and bad-input policy.

    ``options`` holds the kind's options (:attr:`Kind.options`) with defaults filled in;
    ``on_bad_input`` is ``"error"`` or ``"skip"``; ``max_bad_fraction`` is the largest share of
    a source's inputs that may be skipped as bad before prepare fails (None: no limit).
    """

    name: str
    kind: str
    inputs: list[str]
    options: Mapping[str, Any] = field(default_factory=dict)
    on_bad_input: str = "error"
    max_bad_fraction: float | None = None


def assign_split(key: str, val_fraction: float) -> str:
    """``"val"`` for a fixed ~``val_fraction`` of keys (by sha256), else ``"train"``.

    The key is an example's id, or its group when it has one (a dialog's module, say), so that
    a group is held out whole.
    """
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") < val_fraction * 2**64 else "train"


class BadInputs:
    """What prepare does with one source's bad inputs: stop at the first, or skip and count them.

    ``mode`` is ``on_bad_input`` (``"error"`` or ``"skip"``); ``counts`` maps each reason
    (a :class:`~herd.data.inputs.BadInputError` reason) to the inputs skipped for it. With
    ``log=True`` the first few skipped inputs are logged, each naming its file and line.
    ``max_fraction`` is checked by :meth:`check` once the source has been read.
    """

    def __init__(self, mode: str, source: str, log: bool = True, max_fraction: float | None = None) -> None:
        self.mode = mode
        self.source = source
        self.log = log
        self.max_fraction = max_fraction
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

    @property
    def skipped(self) -> dict[str, int]:
        """Skips per reason, sorted by reason (the manifest's ``sources.<name>.skipped``)."""
        return dict(sorted(self.counts.items()))

    def check(self, accepted: int, fix: str) -> None:
        """Fail when every input of the source was bad, or more than ``max_fraction`` of them.

        ``accepted`` counts the inputs that were read fine; ``fix`` is the hint for a source
        whose every input was bad.
        """
        bad = self.counts.total()
        if bad and accepted == 0:
            raise PrepareError(
                f"source {self.source}: every input was skipped as bad ({reasons(self.skipped)}); {fix}"
            )
        if self.max_fraction is not None and bad > self.max_fraction * (bad + accepted):
            raise PrepareError(
                f"source {self.source}: {bad} of {bad + accepted} inputs ({bad / (bad + accepted):.1%}) were "
                f"bad ({reasons(self.skipped)}), more than max_bad_fraction={self.max_fraction} allows; "
                "fix the inputs (the log names the first ones by file and line) or raise "
                f"sources.{self.source}.max_bad_fraction"
            )


def reasons(skipped: Mapping[str, int]) -> str:
    """``"reason: count, ..."`` for messages."""
    return ", ".join(f"{reason}: {count}" for reason, count in skipped.items())


class SplitBuffer:
    """A split's token stream, appended to temporary files, with document boundaries.

    A span appended with a negative document id is padding (whole-example layouts pad each row
    in the stream itself). With ``loss_mask=True`` a per-token mask is kept beside the tokens,
    and each name of ``extras`` (:data:`herd.data.packing.EXTRA_MEMBERS`) keeps one more
    per-token integer array, in the member's dtype.
    """

    def __init__(self, path: Path, loss_mask: bool = False, extras: tuple[str, ...] = ()) -> None:
        unknown = [name for name in extras if name not in EXTRA_MEMBERS]
        if unknown:
            raise ValueError(f"SplitBuffer: unknown extra member(s) {unknown}; known {sorted(EXTRA_MEMBERS)}")
        self.path = path
        self.mask_path = path.with_name(path.name + ".mask") if loss_mask else None
        self.extra_paths = {name: path.with_name(f"{path.name}.{name}") for name in extras}
        self.ends: list[int] = []
        self.ids: list[int] = []
        self.total = 0
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._mask = open(self.mask_path, "wb") if self.mask_path else None  # noqa: SIM115
        self._extras = {name: open(file, "wb") for name, file in self.extra_paths.items()}  # noqa: SIM115

    def append(
        self,
        tokens: np.ndarray,
        document_id: int,
        loss_mask: np.ndarray | None = None,
        extras: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Add one document's tokens (boundaries included), or padding (``document_id < 0``).

        ``loss_mask`` defaults to false, and each extra left out of ``extras`` to its pad value.
        """
        self._file.write(np.asarray(tokens, dtype=np.uint32).tobytes())
        if self._mask is not None:
            mask = np.zeros(len(tokens), bool) if loss_mask is None else np.asarray(loss_mask, bool)
            self._mask.write(mask.astype(np.uint8).tobytes())
        for name, file in self._extras.items():
            member = EXTRA_MEMBERS[name]
            given = (extras or {}).get(name)
            values = np.full(len(tokens), member.pad, member.dtype) if given is None else given
            if len(values) != len(tokens):
                raise ValueError(f"SplitBuffer.append: {len(values)} {name} for {len(tokens)} tokens")
            file.write(np.asarray(values, dtype=member.dtype).tobytes())
        self.total += len(tokens)
        self.ends.append(self.total)
        self.ids.append(document_id)

    def close(self) -> None:
        """Finish writing; :meth:`tokens` may be called afterwards."""
        self._file.close()
        if self._mask is not None:
            self._mask.close()
        for file in self._extras.values():
            file.close()

    def tokens(self) -> np.ndarray:
        """The whole token stream (memory-mapped)."""
        if self.total == 0:
            return np.zeros(0, dtype=np.uint32)
        return np.memmap(self.path, dtype=np.uint32, mode="r", shape=(self.total,))

    def loss_mask(self) -> np.ndarray | None:
        """The loss mask parallel to :meth:`tokens` (memory-mapped uint8), or None without one."""
        if self.mask_path is None:
            return None
        if self.total == 0:
            return np.zeros(0, dtype=np.uint8)
        return np.memmap(self.mask_path, dtype=np.uint8, mode="r", shape=(self.total,))

    def extras(self) -> dict[str, np.ndarray]:
        """Each extra member's array parallel to :meth:`tokens` (memory-mapped); empty without extras."""
        out = {}
        for name, file in self.extra_paths.items():
            dtype = EXTRA_MEMBERS[name].dtype
            if self.total == 0:
                out[name] = np.zeros(0, dtype)
            else:
                out[name] = np.memmap(file, dtype=dtype, mode="r", shape=(self.total,))
        return out


@dataclass(frozen=True)
class Job:
    """What a kind needs to prepare a source: shared by every source of one run."""

    tokenizer: Tokenizer
    pool: WorkerPool
    seq_len: int
    val_fraction: float
    out: Path  # the folder shards are written to (prepare's staging folder)
    scratch: Path  # a temporary folder for split buffers
    progress: Progress
    max_rows: int
    min_count: int

    @property
    def row_len(self) -> int:
        """Tokens per stored row: seq_len inputs and their shifted targets."""
        return self.seq_len + 1

    def buffers(
        self, source: str, loss_mask: bool = False, extras: tuple[str, ...] = ()
    ) -> dict[str, SplitBuffer]:
        """A fresh :class:`SplitBuffer` per split for ``source`` (with a loss mask, with ``extras``)."""
        return {
            split: SplitBuffer(self.scratch / f"{source}.{split}.bin", loss_mask, extras) for split in SPLITS
        }

    def write(self, source: str, split: str, buffer: SplitBuffer) -> dict[str, Any]:
        """Pack a split's buffer into ``<source>/<split>-NNNNNN.tar`` shards (in the worker processes).

        Returns the split's manifest entry (``herd.data.shards.write_split``).
        """
        return write_split(
            self.out,
            f"{source}/{split}",
            buffer.tokens(),
            np.asarray(buffer.ends, np.int64),
            np.asarray(buffer.ids, np.int64),
            row_len=self.row_len,
            pad_id=self.tokenizer.eos_id,
            dtype=token_dtype(self.tokenizer.vocab_size),
            max_rows=self.max_rows,
            min_count=self.min_count,
            map_fn=self.pool.imap,
            loss_mask=buffer.loss_mask(),
            extras=buffer.extras(),
        )


class Kind(Protocol):
    """One kind of example: how to read, validate, encode and write it (see the module docstring)."""

    name: str
    # The kind's per-source options and their defaults (sources.<name>.<option>).
    options: Mapping[str, Any]
    # Defaults of on_bad_input and max_bad_fraction for sources of this kind.
    on_bad_input: str
    max_bad_fraction: float | None

    def check(self, spec: SourceSpec) -> None:
        """Raise PrepareError for an option value the kind cannot use."""

    def texts(self, spec: SourceSpec, val_fraction: float, on_bad_input: BadInputs) -> Iterator[str]:
        """The texts of the source's train examples, to train a tokenizer on."""

    def prepare(self, spec: SourceSpec, job: Job, bad_inputs: BadInputs) -> dict[str, Any]:
        """Encode, pack and write both splits of the source; returns its manifest entry."""

    def summary(self, name: str, entry: Mapping[str, Any]) -> str:
        """One log line about a prepared source, from its manifest entry."""


def kind_of(name: str) -> Kind:
    """The :class:`Kind` registered as ``name`` in :data:`KINDS`."""
    if name not in KINDS:
        raise PrepareError(f"unknown kind {name!r}: a source's kind is one of {sorted(KINDS)}")
    module, _, attribute = KINDS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def source_entry(kind: str, spec: SourceSpec, splits: Mapping[str, Mapping[str, Any]], bad_inputs: BadInputs,
                 **fields: Any) -> dict[str, Any]:
    """The manifest entry of a source of whole examples: its kind, layout and inputs, ``fields``, the
    tokens and trained tokens summed over ``splits``, the skipped inputs, and the splits."""
    return {"kind": kind, "layout": LAYOUTS[kind], "inputs": spec.inputs, **fields,
            "tokens": sum(s["tokens"] for s in splits.values()),
            "trained_tokens": sum(s["trained_tokens"] for s in splits.values()),
            "skipped": bad_inputs.skipped, "splits": splits}


def splits_summary(entry: Mapping[str, Any], unit: str = "rows") -> str:
    """``train R rows in S shards, val R rows in S shards`` of a manifest entry."""
    train, val = entry["splits"]["train"], entry["splits"]["val"]
    return (f"train {train[unit]} {unit} in {len(train['shards'])} shards, "
            f"val {val[unit]} {unit} in {len(val['shards'])} shards")
