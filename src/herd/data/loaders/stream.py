"""The sample stream behind :class:`herd.data.loaders.packed.PackedDataModule`.

Each DataLoader worker of each data-parallel rank is one *reader*. For every source a reader

1. takes its shards for the current pass: all ranks shuffle the source's shard list with the
   same seed (``seed``, source, pass), then reader ``(rank, worker)`` keeps
   ``shards[rank::world_size][worker::num_workers]``, as webdataset's ``split_by_node`` and
   ``split_by_worker`` do. Readers of one pass therefore never share a row, and together they
   read every row of the split once;
2. reads each shard whole and checks it (``herd.data.shards.read_shard``);
3. re-cuts the rows into samples of ``seq_len + 1`` tokens (``herd.data.packing.Rechunker``;
   dialog and preference rows are read at their stored length, one sample per row, targets
   limited by the row's loss mask; a preference row's ``response_ids`` and ``ranks`` are cut
   like its tokens);
4. shuffles the samples of the pass in a buffer (webdataset's ``shuffle``, seeded), then starts
   the next pass, so a pass is an epoch of that source for this reader.

The reader then draws each sample's source at random with the mixture weights (train), or reads
sources one after another (val), and groups samples into batches. Every random choice comes from
a seed derived from (``seed``, segment, rank, reader), so the stream is a pure function of the
plan below, which is what makes resuming exact.

Resuming. Batch ``b`` of a rank comes from reader ``b % num_workers`` (DataLoader's round robin),
so after ``n`` consumed batches, real worker ``w`` plays reader ``(w + n) % num_workers`` and
skips the batches that reader already produced (re-reading them, which costs reading time but
no state). A *segment* is a run of batches under one plan; when seq_len, batch size or weights
change, the finished segments are replayed the same way to find how many rows each reader had
pulled from each source, and the new segment continues from there (the rows still waiting in
shuffle buffers at the switch are skipped, none is repeated). If the number of ranks or workers
changes, positions cannot be mapped: the stream starts over with a new shard order (``epoch``).
"""

from __future__ import annotations

import hashlib
import logging
import random
from bisect import bisect
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import accumulate, count

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from herd.data.packing import Rechunker, Sample
from herd.data.shards import Row, ShardError, ShardInfo, read_shard

logger = logging.getLogger(__name__)

ON_CORRUPT = ("error", "skip")


@dataclass(frozen=True)
class SourceShards:
    """One source as a reader sees it: its shards and how to check them.

    ``loss_mask``: its rows carry a loss mask (dialog and preference sources), which limits the
    targets. ``extras``: the extra members of its rows (``("response_ids", "ranks")`` for
    preference sources), which become batch keys of their own.
    """

    name: str
    shards: tuple[ShardInfo, ...]
    row_len: int
    vocab_size: int
    loss_mask: bool = False
    extras: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """Everything that shapes the train stream. Changing any field starts a new segment."""

    seq_len: int
    batch_size: int
    weights: tuple[float, ...]
    sources: tuple[str, ...]
    world_size: int
    num_workers: int  # readers per rank (DataLoader workers, or 1 for the main process)
    shuffle_buffer: int
    seed: int
    epoch: int = 0  # bumped when positions cannot carry over (world size or workers changed)

    def same_layout(self, other: Plan) -> bool:
        """True when reader positions of ``other`` carry over to this plan."""
        return (self.sources, self.world_size, self.num_workers, self.seed, self.epoch) == (
            other.sources,
            other.world_size,
            other.num_workers,
            other.seed,
            other.epoch,
        )

    def to_dict(self) -> dict:
        """A plain dict of ints, floats, strings and lists (for checkpoints)."""
        return {**asdict(self), "weights": list(self.weights), "sources": list(self.sources)}

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**data, "weights": tuple(data["weights"]), "sources": tuple(data["sources"])})


@dataclass(frozen=True)
class Segment:
    """``batches`` consumed on each rank under ``plan``."""

    plan: Plan
    batches: int = 0


@dataclass
class _Reader:
    """Who is reading: data-parallel rank and the reader (worker) slot within the rank."""

    rank: int
    world_size: int
    slot: int
    slots: int
    skipped_shards: int = 0
    rows_pulled: dict[str, int] = field(default_factory=dict)

    def advance(self, source: str, rows: int) -> None:
        """Count ``rows`` more rows pulled from ``source``."""
        self.rows_pulled[source] = self.rows_pulled.get(source, 0) + rows


def reader_shards(
    shards: Sequence[ShardInfo], rank: int, world_size: int, slot: int, slots: int
) -> list[ShardInfo]:
    """The shards of reader ``slot`` on ``rank``: split by node, then by worker."""
    return list(shards)[rank::world_size][slot::slots]


def pass_order(
    shards: Sequence[ShardInfo], seed: int, source: str, pass_index: int, epoch: int
) -> list[ShardInfo]:
    """The shard order of one pass: a permutation that every rank computes identically."""
    order = list(shards)
    random.Random(_seed("shards", seed, epoch, source, pass_index)).shuffle(order)
    return order


def batches_before(consumed: int, slot: int, slots: int) -> int:
    """How many of the first ``consumed`` batches of a rank came from reader ``slot``."""
    return max(0, -(-(consumed - slot) // slots))


# Keys a PackedStream adds to each batch so that the main process can total the damaged shards
# skipped in the DataLoader workers: the reader (worker) that produced the batch and how many
# shards it has skipped so far. PackedDataModule's loaders remove them before a stage sees a batch.
READER_KEY = "reader"
SKIPPED_SHARDS_KEY = "skipped_shards"


def collate(samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
    """Stack samples into the batch dict: tokens, document_ids, targets, each (batch, seq) int64.

    Samples with extras (preference rows: ``response_ids``, ``ranks``) add one key per extra;
    every sample of a batch must have the same extras.
    """
    names = list(samples[0].extras)
    if any(set(s.extras) != set(names) for s in samples):
        raise ValueError(
            "collate: samples with different extras cannot share a batch "
            f"({sorted({tuple(sorted(s.extras)) for s in samples})})"
        )
    batch = {
        "tokens": torch.from_numpy(np.stack([s.tokens for s in samples])).long(),
        "document_ids": torch.from_numpy(np.stack([s.document_ids for s in samples])).long(),
        "targets": torch.from_numpy(np.stack([s.targets for s in samples])).long(),
    }
    for name in names:
        batch[name] = torch.from_numpy(np.stack([s.extras[name] for s in samples])).long()
    return batch


class PackedStream(IterableDataset):
    """Batches (dicts of tensors) for one rank; use with ``DataLoader(batch_size=None)``.

    ``split="train"``: the infinite weighted mixture of ``history[-1].plan``, starting after the
    ``history[-1].batches`` batches already consumed. ``split="val"``: one pass over every
    source in order, unshuffled, the last batch possibly smaller, ``limit`` batches at most.

    Besides :func:`collate`'s keys, each batch holds two int64 scalars: ``reader`` (the
    DataLoader worker that made it, 0 without workers) and ``skipped_shards`` (damaged shards
    that reader has skipped so far in this iteration, counted up to the moment the batch is
    handed over: each batch is held until the next one is made, so the last batch of a reader
    also counts skips after its last row).
    """

    def __init__(
        self,
        sources: Sequence[SourceShards],
        history: Sequence[Segment],
        rank: int = 0,
        split: str = "train",
        on_corrupt_shard: str = "error",
        limit: int | None = None,
    ) -> None:
        super().__init__()
        if on_corrupt_shard not in ON_CORRUPT:
            raise ValueError(f"on_corrupt_shard must be one of {ON_CORRUPT}, got {on_corrupt_shard!r}")
        self.sources = list(sources)
        self.history = list(history)
        self.rank = rank
        self.split = split
        self.on_corrupt_shard = on_corrupt_shard
        self.limit = limit

    @property
    def plan(self) -> Plan:
        """The plan of the segment being read."""
        return self.history[-1].plan

    @property
    def start_batch(self) -> int:
        """Batches of the current segment already consumed on this rank."""
        return self.history[-1].batches

    def set_start_batch(self, consumed: int) -> None:
        """Resume the current segment after ``consumed`` batches (read when iteration starts)."""
        self.history[-1] = Segment(self.plan, consumed)

    def __len__(self) -> int:
        if self.limit is None:
            raise TypeError("the train stream is infinite; bound training with trainer.max_steps")
        return self.limit

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker, reader = self._reader()
        held = None
        for samples in self._batches(reader):
            if held is not None:
                yield self._tagged(held, worker, reader)
            held = collate(samples)
        if held is not None:
            yield self._tagged(held, worker, reader)

    def sample_batches(self) -> Iterator[list[Sample]]:
        """This worker's batches as lists of samples (before collation)."""
        _, reader = self._reader()
        return self._batches(reader)

    def _reader(self) -> tuple[int, _Reader]:
        """(DataLoader worker id, the reader it plays) for the calling process."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.plan.num_workers:
            raise RuntimeError(
                f"stream planned for {self.plan.num_workers} readers per rank, run by {workers}"
            )
        slot = (worker + self.start_batch) % workers if self.split == "train" else worker
        return worker, _Reader(self.rank, self.plan.world_size, slot, workers)

    @staticmethod
    def _tagged(batch: dict[str, torch.Tensor], worker: int, reader: _Reader) -> dict[str, torch.Tensor]:
        return {
            **batch,
            READER_KEY: torch.tensor(worker, dtype=torch.int64),
            SKIPPED_SHARDS_KEY: torch.tensor(reader.skipped_shards, dtype=torch.int64),
        }

    def _batches(self, reader: _Reader) -> Iterator[list[Sample]]:
        if self.split != "train":
            yield from self._val_batches(reader)
            return
        cursors = self._replay_finished_segments(reader)
        batches = self._train_batches(reader, len(self.history) - 1, cursors)
        for _ in range(batches_before(self.start_batch, reader.slot, reader.slots)):
            next(batches)
        yield from batches

    def mixed_samples(self, reader: _Reader | None = None) -> Iterator[tuple[int, Sample]]:
        """(source index, sample) pairs of the current segment from the start (for inspection)."""
        reader = reader or _Reader(self.rank, self.plan.world_size, 0, self.plan.num_workers)
        return self._mixture(reader, len(self.history) - 1, {})

    # --- train --------------------------------------------------------------------------------

    def _replay_finished_segments(self, reader: _Reader) -> dict[str, int]:
        """Rows each source had given this reader when the current segment began."""
        cursors: dict[str, int] = {}
        for index, segment in enumerate(self.history[:-1]):
            if not segment.plan.same_layout(self.plan):
                cursors = {}
                continue
            batches = self._train_batches(reader, index, cursors)
            for _ in range(batches_before(segment.batches, reader.slot, reader.slots)):
                next(batches)
            cursors = dict(reader.rows_pulled)
        return cursors

    def _train_batches(
        self, reader: _Reader, segment: int, cursors: dict[str, int]
    ) -> Iterator[list[Sample]]:
        plan = self.history[segment].plan
        batch: list[Sample] = []
        for _, sample in self._mixture(reader, segment, cursors):
            batch.append(sample)
            if len(batch) == plan.batch_size:
                yield batch
                batch = []

    def _mixture(
        self, reader: _Reader, segment: int, cursors: dict[str, int]
    ) -> Iterator[tuple[int, Sample]]:
        plan = self.history[segment].plan
        reader.rows_pulled = dict(cursors)
        streams = [
            self._source_samples(source, reader, plan, segment, cursors.get(source.name, 0))
            for source in self.sources
        ]
        thresholds = list(accumulate(w / sum(plan.weights) for w in plan.weights))
        rng = random.Random(_seed("mixture", plan.seed, plan.epoch, segment, reader.rank, reader.slot))
        while True:
            index = min(bisect(thresholds, rng.random()), len(streams) - 1)
            yield index, next(streams[index])

    def _source_samples(self, source, reader, plan, segment, start_row) -> Iterator[Sample]:
        """One source's samples for this reader, pass after pass, from row ``start_row`` on."""
        rng = random.Random(
            _seed("buffer", plan.seed, plan.epoch, segment, source.name, reader.rank, reader.slot)
        )
        shuffle = wds.shuffle(plan.shuffle_buffer, initial=plan.shuffle_buffer, rng=rng)
        for pass_index in count():
            order = pass_order(source.shards, plan.seed, source.name, pass_index, plan.epoch)
            shards = reader_shards(order, reader.rank, reader.world_size, reader.slot, reader.slots)
            rows_in_pass = sum(s.rows for s in shards)
            if start_row >= rows_in_pass > 0:  # resuming: this pass was read before
                start_row -= rows_in_pass
                continue
            samples = _rechunked(self._rows(source, shards, reader, skip=start_row), plan.seq_len)
            produced = 0
            for sample in shuffle(samples) if plan.shuffle_buffer > 1 else samples:
                produced += 1
                yield sample
            if produced == 0 and start_row == 0:
                raise ValueError(
                    f"source {source.name!r} gives rank {reader.rank} reader {reader.slot} only "
                    f"{rows_in_pass} rows of {source.row_len} tokens per pass, not one sample of "
                    f"seq_len + 1 = {plan.seq_len + 1}: lower seq_len, or use fewer ranks or workers"
                )
            start_row = 0

    def _rows(
        self, source: SourceShards, shards: list[ShardInfo], reader: _Reader, skip: int
    ) -> Iterator[Row]:
        """Rows of ``shards`` after the first ``skip``; advances the reader's row count per source."""
        damaged = 0
        for shard in shards:
            if skip >= shard.rows:
                skip -= shard.rows
                continue
            rows = self._read(shard, source, reader)
            if rows is None:
                damaged += 1
                reader.advance(source.name, shard.rows - skip)
            for row in rows[skip:] if rows is not None else ():
                reader.advance(source.name, 1)
                yield row
            skip = 0
        if damaged and damaged == len(shards):
            raise ShardError(
                f"every shard of source {source.name!r} on rank {reader.rank} reader {reader.slot} is damaged"
            )

    def _read(self, shard: ShardInfo, source: SourceShards, reader: _Reader) -> list[Row] | None:
        """The rows of a shard, or None when it is damaged and damaged shards are skipped."""
        try:
            return read_shard(shard, source.row_len, source.vocab_size, source.loss_mask, source.extras)
        except ShardError as err:
            if self.on_corrupt_shard == "error":
                raise
            reader.skipped_shards += 1
            logger.warning("skipped shard (%d so far on this reader): %s", reader.skipped_shards, err)
            return None

    # --- val ----------------------------------------------------------------------------------

    def _val_batches(self, reader: _Reader) -> Iterator[list[Sample]]:
        batch: list[Sample] = []
        for source in self.sources:
            shards = reader_shards(source.shards, reader.rank, reader.world_size, reader.slot, reader.slots)
            for sample in _rechunked(self._rows(source, shards, reader, skip=0), self.plan.seq_len):
                batch.append(sample)
                if len(batch) == self.plan.batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch


def val_batches_per_rank(sources: Sequence[SourceShards], plan: Plan) -> list[int]:
    """How many val batches each rank's loader yields (from the manifest's row counts)."""
    per_rank = []
    for rank in range(plan.world_size):
        batches = 0
        for slot in range(plan.num_workers):
            samples = 0
            for source in sources:
                shards = reader_shards(source.shards, rank, plan.world_size, slot, plan.num_workers)
                samples += sum(s.rows for s in shards) * source.row_len // (plan.seq_len + 1)
            batches += -(-samples // plan.batch_size)
        per_rank.append(batches)
    return per_rank


def _rechunked(rows: Iterator[Row], seq_len: int) -> Iterator[Sample]:
    rechunker = Rechunker(seq_len)
    for row in rows:
        yield from rechunker.add(row.tokens, row.document_ids, row.index, row.loss_mask, row.extras)


def _seed(*parts: object) -> int:
    """A 64-bit seed from any tuple of values, identical on every machine and Python run."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big")
