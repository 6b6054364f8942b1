"""Packing documents into fixed-length rows, and re-cutting rows into training samples.

Prepare side, text: each document becomes ``<|begin_of_text|> tokens <|end_of_text|>``; a
source's documents are concatenated in order and cut into rows of ``row_len = seq_len + 1``
tokens, with a parallel array of document ids. Rows are disjoint, so every token is stored
exactly once. Only the last row of a split is padded, with ``end_of_text`` tokens whose document
id is :data:`PAD_DOCUMENT_ID`.

Prepare side, whole examples (dialogs): :class:`WholePacker` places each example, never split,
first-fit into one of a few open rows; a row's unused tail is padding. Such rows also carry a
per-token loss mask (true on the tokens a model is trained to predict, e.g. the assistant's),
and some kinds carry further per-token integer members, the *extras* of :data:`EXTRA_MEMBERS`
(a preference row's ``response_ids`` and ``ranks``).

Read side: :class:`Rechunker` concatenates the rows of a stream and cuts samples of any
``seq_len + 1``; with the stored length it returns the rows unchanged. A sample's document ids
are renumbered from 0 and a new id starts wherever the document changes or two rows that were
not neighbours in the packed stream meet, so attention masks never join unrelated text.
Targets are the next token, or :data:`IGNORE_INDEX` where the next token belongs to another
document or either token is padding, or, for rows with a loss mask, where the mask is false on
the next (the predicted) token. A row's extras are cut like its tokens: a sample carries the
values of its input positions.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from herd.constants import IGNORE_INDEX

PAD_DOCUMENT_ID = -1
T = TypeVar("T", bound=Hashable)


@dataclass(frozen=True)
class ExtraMember:
    """A per-token integer member a row may carry besides tokens, document ids and loss mask.

    ``dtype`` is how it is stored; ``minimum`` its smallest valid value (checked when a shard is
    read); ``pad`` its value on padding.
    """

    dtype: np.dtype
    minimum: int
    pad: int


# The extras a row layout may name (herd.data.shards.LAYOUTS), by member name:
# - response_ids: 0 on a prompt and on padding, k = 1, 2, ... on the tokens of the k-th response
#   of a preference ranking in its row;
# - ranks: the rank of the response a token belongs to (0 = best), -1 on a prompt and padding.
EXTRA_MEMBERS: dict[str, ExtraMember] = {
    "response_ids": ExtraMember(np.dtype(np.int16), minimum=0, pad=0),
    "ranks": ExtraMember(np.dtype(np.int16), minimum=-1, pad=-1),
}


@dataclass(frozen=True)
class PackedRows:
    """``tokens`` and ``document_ids``, both of shape (rows, row_len), an optional loss mask, extras.

    ``loss_mask`` (rows, row_len) bool, or None for text: true where a token is to be predicted.
    ``extras`` maps names of :data:`EXTRA_MEMBERS` to (rows, row_len) integer arrays (none for
    text and dialogs).
    """

    tokens: np.ndarray
    document_ids: np.ndarray
    loss_mask: np.ndarray | None = None
    extras: Mapping[str, np.ndarray] = field(default_factory=dict)


def with_boundaries(ids: Sequence[int] | np.ndarray, bos_id: int | None, eos_id: int) -> np.ndarray:
    """``[bos] + ids + [eos]`` as uint32 (``ids + [eos]`` for a tokenizer without a bos token)."""
    start = 0 if bos_id is None else 1
    out = np.empty(len(ids) + start + 1, dtype=np.uint32)
    if bos_id is not None:
        out[0] = bos_id
    out[-1] = eos_id
    out[start:-1] = ids
    return out


def num_rows(num_tokens: int, row_len: int) -> int:
    """Rows needed to hold ``num_tokens`` (the last one padded)."""
    return -(-num_tokens // row_len)


def pack_documents(
    documents: Sequence[np.ndarray], row_len: int, pad_id: int, document_ids: Sequence[int] | None = None
) -> PackedRows:
    """Concatenate ``documents`` (token arrays, boundaries included) and cut them into rows."""
    ids = np.arange(len(documents)) if document_ids is None else np.asarray(document_ids)
    flat = np.concatenate(documents) if documents else np.zeros(0, dtype=np.uint32)
    ends = np.cumsum([len(d) for d in documents], dtype=np.int64)
    return pack_range(flat, ends, ids, row_len, pad_id, 0, num_rows(flat.size, row_len))


def pack_range(
    flat: np.ndarray,
    document_ends: np.ndarray,
    document_ids: np.ndarray,
    row_len: int,
    pad_id: int,
    first_row: int,
    end_row: int,
    loss_mask: np.ndarray | None = None,
    extras: Mapping[str, np.ndarray] | None = None,
) -> PackedRows:
    """Rows ``first_row .. end_row-1`` of the packed stream ``flat``.

    ``document_ends[i]`` is the end offset of document ``i`` in ``flat``; its id is
    ``document_ids[i]`` (a span with id :data:`PAD_DOCUMENT_ID` is padding inside the stream).
    Positions past the end of ``flat`` are padding. ``loss_mask``, parallel to ``flat``, is cut
    the same way (false on padding), and so is each of ``extras`` (name -> array parallel to
    ``flat``; the member's pad value on padding).
    """
    start, stop = first_row * row_len, min(end_row * row_len, flat.size)
    size = (end_row - first_row) * row_len
    tokens = np.full(size, pad_id, dtype=np.uint32)
    tokens[: stop - start] = flat[start:stop]
    index = np.searchsorted(document_ends, np.arange(start, stop), side="right")
    docs = np.full(size, PAD_DOCUMENT_ID, dtype=np.int32)
    docs[: stop - start] = np.asarray(document_ids)[index]
    mask = None
    if loss_mask is not None:
        mask = np.zeros(size, dtype=bool)
        mask[: stop - start] = loss_mask[start:stop]
        mask = mask.reshape(-1, row_len)
    cut = {}
    for name, values in (extras or {}).items():
        member = EXTRA_MEMBERS[name]
        out = np.full(size, member.pad, dtype=member.dtype)
        out[: stop - start] = values[start:stop]
        cut[name] = out.reshape(-1, row_len)
    return PackedRows(tokens.reshape(-1, row_len), docs.reshape(-1, row_len), mask, cut)


class WholePacker(Generic[T]):
    """Packs examples whole, first-fit, into rows of ``row_len`` tokens; deterministic.

    :meth:`add` places an example of ``length`` tokens (at most ``row_len``) in the first open row
    with room for it, or opens a new row. At most ``open_rows`` rows are open: opening one more
    closes the oldest, and a row that is full closes at once (an example of ``row_len`` tokens
    is a row by itself). Closed rows come back from
    :meth:`add` and, at the end, :meth:`finish`, as lists of the examples they hold, in order.
    """

    def __init__(self, row_len: int, open_rows: int = 16) -> None:
        if row_len < 1 or open_rows < 1:
            raise ValueError(f"WholePacker needs row_len >= 1 and open_rows >= 1, got {row_len}, {open_rows}")
        self.row_len = row_len
        self.open_rows = open_rows
        self._rows: list[tuple[list[T], list[int]]] = []  # (examples, [tokens used]) per open row

    def add(self, example: T, length: int) -> list[list[T]]:
        """Place one example; returns the rows this closed."""
        if not 0 < length <= self.row_len:
            raise ValueError(f"an example of {length} tokens does not fit a row of {self.row_len}")
        closed = []
        for index, (examples, used) in enumerate(self._rows):
            if used[0] + length <= self.row_len:
                examples.append(example)
                used[0] += length
                if used[0] == self.row_len:
                    closed.append(self._rows.pop(index)[0])
                return closed
        if length == self.row_len:  # a row of its own, closed at once: no open row need close
            return [[example]]
        if len(self._rows) == self.open_rows:
            closed.append(self._rows.pop(0)[0])
        self._rows.append(([example], [length]))
        return closed

    def finish(self) -> list[list[T]]:
        """Close and return the rows still open."""
        rows, self._rows = [examples for examples, _ in self._rows], []
        return rows


def next_token_targets(
    tokens: np.ndarray, segments: np.ndarray, pad: np.ndarray, loss_mask: np.ndarray | None = None
) -> np.ndarray:
    """Targets for ``tokens[:-1]``: ``tokens[1:]``, or IGNORE_INDEX across documents and padding.

    With ``loss_mask`` (parallel to ``tokens``), also IGNORE_INDEX where the predicted token,
    ``tokens[i + 1]``, is not in the mask.
    """
    valid = (segments[1:] == segments[:-1]) & ~pad[1:] & ~pad[:-1]
    if loss_mask is not None:
        valid &= loss_mask[1:]
    return np.where(valid, tokens[1:].astype(np.int32), np.int32(IGNORE_INDEX))


@dataclass(frozen=True)
class Sample:
    """One training sequence: ``tokens``, ``document_ids`` and ``targets``, each (seq_len,) int32.

    ``extras``: the row's extra members (:data:`EXTRA_MEMBERS`) at the input positions, each
    (seq_len,) int32; empty for text and dialogs. int32 halves the memory of shuffle buffers;
    batches are widened to int64 when collated.
    """

    tokens: np.ndarray
    document_ids: np.ndarray
    targets: np.ndarray
    extras: Mapping[str, np.ndarray] = field(default_factory=dict)


class Rechunker:
    """Cuts a stream of stored rows into samples of ``seq_len + 1`` tokens.

    Feed rows in stream order with :meth:`add`; each call returns the samples completed so far.
    ``row_index`` is the row's position in its packed split: rows continue each other only when
    indices are consecutive. Leftover tokens shorter than a sample stay pending (drop them with
    :meth:`reset` at the end of a pass). Rows with a loss mask (dialogs, preference rankings) are
    meant to be read at their stored length, one sample per row; the mask then limits the
    targets. A row's extras (``response_ids``, ``ranks``) are cut like its tokens.
    """

    def __init__(self, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.sample_len = seq_len + 1
        self.reset()

    def reset(self) -> None:
        """Forget pending tokens and the previous row."""
        self._pending: list[_Pending] = []
        self._pending_len = 0
        self._segment = 0
        self._previous: tuple[int, int] | None = None  # (row_index, last document id)

    def add(
        self,
        tokens: np.ndarray,
        document_ids: np.ndarray,
        row_index: int,
        loss_mask: np.ndarray | None = None,
        extras: Mapping[str, np.ndarray] | None = None,
    ) -> list[Sample]:
        """Append one stored row (with its loss mask and extras, if any); return the samples it completes."""
        extras = dict(extras or {})
        if self._pending:
            first = self._pending[0]
            if (loss_mask is None) != (first.mask is None):
                raise ValueError("Rechunker: rows with and without a loss mask cannot be mixed in one stream")
            if set(extras) != set(first.extras):
                raise ValueError(
                    f"Rechunker: rows with the extras {sorted(first.extras)} and {sorted(extras)} cannot be "
                    "mixed in one stream"
                )
        segments = self._segments(document_ids, row_index)
        mask = None if loss_mask is None else np.asarray(loss_mask, dtype=bool)
        self._pending.append(_Pending(tokens, segments, document_ids < 0, mask, extras))
        self._pending_len += len(tokens)
        samples = []
        while self._pending_len >= self.sample_len:
            samples.append(self._cut())
        return samples

    def _segments(self, document_ids: np.ndarray, row_index: int) -> np.ndarray:
        """Running segment numbers: +1 at each document change or stream discontinuity."""
        change = np.empty(len(document_ids), dtype=np.int64)
        change[1:] = document_ids[1:] != document_ids[:-1]
        continues = self._previous == (row_index - 1, int(document_ids[0]))
        change[0] = 0 if continues else 1
        segments = self._segment + np.cumsum(change)
        self._segment = int(segments[-1])
        self._previous = (row_index, int(document_ids[-1]))
        return segments

    def _cut(self) -> Sample:
        """Take one sample's tokens off the front of the pending rows."""
        pending = self._pending[0] if len(self._pending) == 1 else _Pending.join(self._pending)
        n = self.sample_len
        rest = pending.slice(n, None)
        self._pending = [rest] if len(pending.tokens) > n else []
        self._pending_len = len(pending.tokens) - n
        head = pending.slice(0, n)
        return Sample(
            tokens=head.tokens[:-1].astype(np.int32),
            document_ids=(head.segments[:-1] - head.segments[0]).astype(np.int32),
            targets=next_token_targets(head.tokens, head.segments, head.pad, head.mask),
            extras={name: values[:-1].astype(np.int32) for name, values in head.extras.items()},
        )


@dataclass(frozen=True)
class _Pending:
    """Tokens of stored rows not yet cut into samples, with everything cut alongside them."""

    tokens: np.ndarray
    segments: np.ndarray
    pad: np.ndarray
    mask: np.ndarray | None
    extras: dict[str, np.ndarray]

    @classmethod
    def join(cls, parts: Sequence[_Pending]) -> _Pending:
        """The parts one after another."""
        first = parts[0]
        return cls(
            np.concatenate([p.tokens for p in parts]),
            np.concatenate([p.segments for p in parts]),
            np.concatenate([p.pad for p in parts]),
            None if first.mask is None else np.concatenate([p.mask for p in parts]),
            {name: np.concatenate([p.extras[name] for p in parts]) for name in first.extras},
        )

    def slice(self, start: int, stop: int | None) -> _Pending:
        """Positions ``start .. stop-1`` of every array."""
        cut = slice(start, stop)
        mask = None if self.mask is None else self.mask[cut]
        extras = {name: values[cut] for name, values in self.extras.items()}
        return _Pending(self.tokens[cut], self.segments[cut], self.pad[cut], mask, extras)
