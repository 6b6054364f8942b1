"""What the DataModules of media kinds share (images, audio): sources, the stream, skips, token rows.

A media DataModule (:class:`MediaDataModule`) reads the sources of one media kind
(``herd.data.kinds.media``) and gives batches that a :class:`Featurizer` and a collate function of
the kind's own make. Shared here:

- sources: every source of the kind in ``data_dir``, or named ones with weights, each from its
  own prepared folder (all with one tokenizer);
- the stream (:class:`MediaStream`): the train stream is infinite. Each pass goes over every
  source in a shuffled shard order, and the sources are mixed by weight. A pass is shared among
  the data-parallel ranks (:mod:`herd.data.loaders.ranks`: tensor-parallel ranks of one replica
  read the same examples) and DataLoader workers: by shard when there are enough shards, by
  example otherwise.
  Resuming does not replay the interrupted pass: it starts a new shuffled one. The val stream
  reads every val example once. Each rank gets the same number of examples (the remainder of the
  division by the world size is left out) and so the same number of batches;
- skips: a media file that fails to decode is skipped, naming its key in a warning, and counted
  (the kind's ``skipped_key``, e.g. ``skipped_images``). In training it is left out. In
  validation it stays as a blank stand-in whose targets are all -100, so every rank keeps its
  number of batches. A shard that fails its checks raises
  :class:`~herd.data.shards.ShardError`, or is skipped with ``on_corrupt_shard="skip"``;
- :func:`token_rows`: token rows right-padded with ``<|end_of_text|>`` and their targets: the next
  token where it is trained on (``loss_mask``), else -100.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from herd.constants import IGNORE_INDEX
from herd.data.inputs import BadInputError
from herd.data.kinds.media import ExampleRow, read_example_shard
from herd.data.loaders.ranks import data_parallel_rank
from herd.data.manifest import Manifest, ManifestError, Manifests
from herd.data.shards import ShardError, ShardInfo
from herd.paths import resolve_location

logger = logging.getLogger(__name__)
ON_CORRUPT = ("error", "skip")
_LOGGED_SKIPS = 10


class Featurizer(Protocol):
    """Turns a stored example into a dict for the collate function; the kind's own part of the stream.

    The dict holds at least ``tokens`` (int64) and ``loss_mask`` (bool) of the same length.
    """

    def __call__(self, row: ExampleRow, key: str) -> dict[str, Any]:
        """The example's features; BadInputError when its media does not decode."""

    def blank(self, row: ExampleRow) -> dict[str, Any]:
        """A stand-in for an example whose media does not decode (validation keeps it, untrained)."""


class MediaDataModule(L.LightningDataModule):
    """Sources of one media kind from prepared folders; see the module docstring.

    A subclass sets the class attributes below and provides :meth:`featurizer` and
    :meth:`collate`.

    Args:
        data_dir: prepared folder (or URL) with manifest.json; the default for every source.
        sources: ``{name: {weight, data_dir, source}}``, every key optional; None: every source of
            the kind in ``data_dir``.
        batch_size, val_batch_size: examples per batch (val default: batch_size).
        num_workers: DataLoader worker processes per rank (0: read in the main process).
        shuffle_buffer: examples per reader held for shuffling (1: no shuffling).
        seed: seeds shard order, shuffling and the mixture.
        tokenizer: the tokenizer folder of this data (default: the one saved with the first source).
        expected_vocab_size, expected_tokenizer_fingerprint: refuse data of another tokenizer.
        on_corrupt_shard: ``"error"`` or ``"skip"``.
        seq_len: accepted for the shared data options; examples keep their own length.
    """

    # Its loader workers decode images or audio: each keeps a core busy (herd.threads leaves them one).
    decodes_media = True

    kind = ""  # the source kind read ("image")
    skipped_key = ""  # the per-batch skip count's key and the state's ("skipped_images")
    new_ids = 0  # ids past the tokenizer's vocabulary that the rows may hold
    noun = ""  # one media file in messages ("an image")
    prepare_hint = ""  # how to prepare such data ("make prepare-vision")

    def __init__(
        self,
        data_dir: str | None = None,
        sources: Mapping[str, Mapping[str, Any] | None] | None = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 1,
        shuffle_buffer: int = 1000,
        seed: int = 1234,
        tokenizer: str | None = None,
        expected_vocab_size: int | None = None,
        expected_tokenizer_fingerprint: str | None = None,
        on_corrupt_shard: str = "error",
        seq_len: int | None = None,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if on_corrupt_shard not in ON_CORRUPT:
            raise ValueError(f"data.on_corrupt_shard must be one of {ON_CORRUPT}, got {on_corrupt_shard!r}")
        for name, value in (("batch_size", batch_size), ("shuffle_buffer", shuffle_buffer)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = int(seed)
        self.on_corrupt_shard = on_corrupt_shard
        self.pin_memory = pin_memory
        self.manifests = Manifests()
        self.sources = self._load_sources(data_dir, sources)
        for manifest in self.manifests.values():
            manifest.check_tokenizer(expected_vocab_size, expected_tokenizer_fingerprint)
        self.seq_len = seq_len or int(self.manifest.data.get("seq_len", 0)) or None
        self.tokenizer = resolve_location(tokenizer) if tokenizer else self.manifest.tokenizer_location
        self.skipped_media = 0
        self.train_batches = 0

    # --- the kind's own

    def featurizer(self) -> Featurizer:
        """The kind's featurizer; RuntimeError naming the fix when the stage has not set what it needs."""
        raise NotImplementedError

    def collate(self) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        """The kind's collate function."""
        raise NotImplementedError

    # --- shared

    @property
    def manifest(self) -> Manifest:
        """The manifest of the first source (all sources share one tokenizer)."""
        return next(iter(self.manifests.values()))

    @property
    def pad_id(self) -> int:
        """``<|end_of_text|>``, the padding of every row."""
        return int(self.manifest.data["tokenizer"]["special_ids"]["end_of_text"])

    def source_id(self, key: str, what: str) -> int:
        """An id every source's manifest entry records as ``key``; ManifestError when they disagree."""
        ids = {int(s["manifest"].data["sources"][s["source"]][key]) for s in self.sources}
        if len(ids) != 1:
            raise ManifestError(f"the {self.kind} sources disagree on the {what} id ({sorted(ids)}); prepare them "
                                "with one tokenizer")
        return ids.pop()

    def _load_sources(self, data_dir, sources) -> list[dict[str, Any]]:
        kind = self.kind
        if sources is None:
            if data_dir is None:
                raise ValueError(f"data.data_dir is not set: give the folder herd.prepare wrote the {kind} data to")
            manifest = self.manifests.load(data_dir)
            sources = {name: {} for name in manifest.source_names() if manifest.source_kind(name) == kind}
            if not sources:
                raise ManifestError(f"{manifest.location} has no {kind} sources (kind: {kind}); prepare one, e.g. "
                                    f"{self.prepare_hint}")
        out = []
        for name, options in sources.items():
            options = dict(options or {})
            manifest, stored = self.manifests.source(name, options, data_dir)
            if stored not in manifest.source_names():
                raise ManifestError(f"source {stored!r} is not in {manifest.location} (it has "
                                    f"{manifest.source_names()})")
            found = manifest.source_kind(stored)
            if found != kind:
                raise ManifestError(f"source {stored!r} in {manifest.location} holds {found} examples; the {kind} "
                                    f"DataModule reads {kind} sources (kind: {kind}) only")
            out.append({"name": name, "manifest": manifest, "source": stored,
                        "weight": float(options.get("weight", 1.0)),
                        "train": manifest.shards(stored, "train"), "val": manifest.shards(stored, "val")})
        if any(s["weight"] < 0 for s in out) or sum(s["weight"] for s in out) <= 0:
            raise ValueError("data.sources weights must be >= 0 and not all 0")
        return out


    def train_dataloader(self) -> DataLoader:
        """The train mixture for this rank: an endless stream of shuffled passes."""
        return self._loader(self._stream("train", self.batch_size), self.batch_size)

    def val_dataloader(self) -> DataLoader:
        """Every val example once, the same number on every rank."""
        return self._loader(self._stream("val", self.val_batch_size), self.val_batch_size)

    def _stream(self, split: str, batch_size: int) -> MediaStream:
        featurizer = self.featurizer()
        rank, world = data_parallel_rank(getattr(self, "trainer", None))
        shards = [(s["train"] if split == "train" else s["val"]) for s in self.sources]
        return MediaStream(shards, [s["weight"] for s in self.sources], split, featurizer, self,
                           self.manifest.vocab_size + self.new_ids, rank, world, self.seed + self.train_batches)

    def _loader(self, stream: MediaStream, batch_size: int) -> DataLoader:
        return DataLoader(stream, batch_size=batch_size, num_workers=self.num_workers, pin_memory=self.pin_memory,
                          collate_fn=self.collate(), persistent_workers=False)

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Take the readers' skip counts out of the batch; count train batches (for the next pass's seed)."""
        self.skipped_media += int(batch.pop(self.skipped_key, torch.zeros(())).sum())
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            self.train_batches += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Train batches consumed (a resumed run seeds its new pass with it) and media skipped."""
        return {"train_batches": self.train_batches, self.skipped_key: self.skipped_media}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_batches = int(state.get("train_batches", 0))
        self.skipped_media = int(state.get(self.skipped_key, 0))


class MediaStream(IterableDataset):
    """Examples of one split as dicts ready for the kind's collate function (see the module docstring)."""

    def __init__(self, shards: list[list[ShardInfo]], weights: list[float], split: str, featurizer: Featurizer,
                 module: MediaDataModule, vocab_limit: int, rank: int, world: int, seed: int) -> None:
        self.shards, self.weights, self.split, self.featurizer = shards, weights, split, featurizer
        self.kind, self.skipped_key, self.noun = module.kind, module.skipped_key, module.noun
        self.shuffle_buffer, self.on_corrupt = module.shuffle_buffer, module.on_corrupt_shard
        self.vocab_limit, self.rank, self.world, self.seed = vocab_limit, rank, world, seed
        self._skipped = 0
        self._logged = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.split == "val":
            yield from self._val(worker, workers)
        else:
            yield from self._train(worker, workers)

    def _val(self, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        total = sum(shard.rows for shards in self.shards for shard in shards)
        kept = total // self.world * self.world  # equal counts on every rank
        index = 0
        for shards in self.shards:
            for shard in shards:
                for row in self._rows(shard):
                    mine = index % self.world == self.rank and (index // self.world) % workers == worker
                    if index < kept and mine:
                        yield self._example(row, keep_bad=True)
                    index += 1

    def _train(self, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        readers, slot = self.world * workers, self.rank * workers + worker
        rng = random.Random(f"{self.seed}:{slot}")
        streams = [self._source_passes(shards, readers, slot, source) for source, shards in enumerate(self.shards)]
        buffer: list[dict[str, Any]] = []
        while True:
            source = rng.choices(range(len(streams)), weights=self.weights)[0]
            example = next(streams[source], None)
            if example is None:
                raise ShardError(f"an {self.kind} source has no readable train examples for this reader; check its "
                                 "shards (or lower data.num_workers x ranks below its number of examples)")
            buffer.append(example)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))

    def _source_passes(self, shards: list[ShardInfo], readers: int, slot: int, source: int
                       ) -> Iterator[dict[str, Any]]:
        """Endless passes over one source's train shards: this reader's share, a new shard order each pass."""
        by_shard = len(shards) >= readers
        for epoch in range(1 << 62):
            order = list(shards)
            random.Random(f"{self.seed}:{source}:{epoch}").shuffle(order)
            produced = False
            for position, shard in enumerate(order):
                if by_shard and position % readers != slot:
                    continue
                for row in self._rows(shard):
                    if by_shard or row.index % readers == slot:
                        example = self._example(row, keep_bad=False)
                        if example is not None:
                            produced = True
                            yield example
            if not produced and epoch > 0:
                return

    def _rows(self, shard: ShardInfo) -> list[ExampleRow]:
        try:
            return read_example_shard(shard, self.vocab_limit, self.kind)
        except ShardError as err:
            if self.on_corrupt == "error":
                raise
            logger.warning("skipping damaged shard %s: %s", shard.url, err)
            return []

    def _example(self, row: ExampleRow, keep_bad: bool) -> dict[str, Any] | None:
        key = f"{row.description.get('id', row.index)}"
        try:
            example = self.featurizer(row, key)
        except BadInputError as err:
            self._skipped += 1
            if self._logged < _LOGGED_SKIPS:
                self._logged += 1
                logger.warning("skipped %s that does not decode (example %d, %s): %s", self.noun, row.index, key, err)
            if not keep_bad:
                return None
            example = self.featurizer.blank(row)
            example["loss_mask"] = np.zeros_like(example["loss_mask"])
        skipped, self._skipped = self._skipped, 0
        example[self.skipped_key] = skipped
        return example


def token_rows(examples: list[dict[str, Any]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, targets)`` (batch, seq) int64 of the examples' ``tokens`` and ``loss_mask``.

    Rows are right-padded with ``pad_id`` to the longest; ``targets[t]`` is ``tokens[t + 1]`` where
    that token is trained on, else -100.
    """
    batch, seq = len(examples), max(len(e["tokens"]) for e in examples)
    tokens = torch.full((batch, seq), pad_id, dtype=torch.long)
    targets = torch.full((batch, seq), IGNORE_INDEX, dtype=torch.long)
    for i, example in enumerate(examples):
        ids = torch.as_tensor(np.asarray(example["tokens"], np.int64))
        mask = torch.from_numpy(np.asarray(example["loss_mask"], bool))
        tokens[i, : len(ids)] = ids
        targets[i, : len(ids) - 1] = torch.where(mask[1:], ids[1:], IGNORE_INDEX)
    return tokens, targets
