"""ImageCaptionDataModule: prepared image-caption shards (``herd.data.images``) as batches for stage=vision_adapter.

Batches are dicts of tensors; row i holds example i and image i:

- ``tokens`` (batch, seq) int64: ``<|image|> <|begin_of_text|> prompt caption <|end_of_text|>``,
  right-padded with ``<|end_of_text|>`` to the longest example of the batch;
- ``targets`` (batch, seq): the next token where it is a caption token (or the closing
  ``<|end_of_text|>``), else -100, so the loss covers the caption only;
- ``pixel_values`` (batch, tiles, 3, size, size) float32: each image's tiles, zero-padded to the
  batch's largest tile count (not to ``max_num_tiles``);
- ``aspect_ratio_ids``, ``num_tiles``, ``image_rows`` (batch,) int64.

The tiling is the model's, so the stage sets it (:meth:`ImageCaptionDataModule.set_tiler`)
before any dataloader is made.

The train stream is infinite. Each pass goes over every source in a shuffled shard order, and
the sources are mixed by weight. A pass is shared among the ranks and DataLoader workers: by
shard when there are enough shards, by example otherwise. Resuming does not replay the
interrupted pass: it starts a new shuffled one. The val stream reads every val example once.
Each rank gets the same number of examples (the remainder of the division by the world size is
left out) and so the same number of batches.

An image that fails to decode is skipped, naming its key in a warning, and counted in
:attr:`ImageCaptionDataModule.skipped_images`. In training it is left out. In validation it
stays as a blank image whose targets are all -100, so every rank keeps its number of batches.
A shard that fails its checks raises :class:`~herd.data.shards.ShardError`, or is skipped with
``on_corrupt_shard="skip"``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from herd.data.images import NEW_TOKENS, ImageRow, ImageTiler, decode_image, read_image_shard
from herd.data.shards import Manifest, ManifestError, ShardError, ShardInfo
from herd.data.sources import BadInputError
from herd.paths import resolve_location

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100
ON_CORRUPT = ("error", "skip")
SKIPPED_KEY = "skipped_images"  # per-batch count of images a reader skipped since its previous batch
_LOGGED_SKIPS = 10


class ImageCaptionDataModule(L.LightningDataModule):
    """Image-caption sources of prepared folders; see the module docstring.

    Args:
        data_dir: prepared folder (or URL) with manifest.json; the default for every source.
        sources: ``{name: {weight, data_dir, source}}``, every key optional; None: every image
            source of ``data_dir``.
        batch_size, val_batch_size: examples per batch (val default: batch_size).
        num_workers: DataLoader worker processes per rank (0: read in the main process).
        shuffle_buffer: examples per reader held for shuffling (1: no shuffling).
        seed: seeds shard order, shuffling and the mixture.
        tokenizer: the tokenizer folder of this data (default: the one saved with the first source).
        expected_vocab_size, expected_tokenizer_fingerprint: refuse data of another tokenizer.
        on_corrupt_shard: ``"error"`` or ``"skip"``.
        seq_len: accepted for the shared data options; examples keep their own length.
    """

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
        self.manifests: dict[str, Manifest] = {}
        self.sources = self._load_sources(data_dir, sources)
        for manifest in self.manifests.values():
            manifest.check_tokenizer(expected_vocab_size, expected_tokenizer_fingerprint)
        self.image_token_id = self._image_token_id()
        self.seq_len = seq_len or int(self.manifest.data.get("seq_len", 0)) or None
        self.tokenizer = resolve_location(tokenizer) if tokenizer else self.manifest.tokenizer_location
        self.tiler: ImageTiler | None = None
        self.skipped_images = 0
        self.train_batches = 0

    @property
    def manifest(self) -> Manifest:
        """The manifest of the first source (all sources share one tokenizer)."""
        return next(iter(self.manifests.values()))

    @property
    def pad_id(self) -> int:
        """``<|end_of_text|>``, the padding of every row."""
        return int(self.manifest.data["tokenizer"]["special_ids"]["end_of_text"])

    def set_tiler(self, tiler: ImageTiler) -> None:
        """The model's tiling (:meth:`ImageTiler.for_model`); needed before any dataloader is made."""
        self.tiler = tiler

    def _load_sources(self, data_dir, sources) -> list[dict[str, Any]]:
        if sources is None:
            if data_dir is None:
                raise ValueError("data.data_dir is not set: give the folder herd.prepare wrote the images to")
            manifest = self._manifest(data_dir)
            sources = {name: {} for name in manifest.source_names() if manifest.source_kind(name) == "image"}
            if not sources:
                raise ManifestError(f"{manifest.location} has no image sources (kind: image); prepare one, e.g. "
                                    "make prepare-vision")
        out = []
        for name, options in sources.items():
            options = dict(options or {})
            location = options.get("data_dir") or data_dir
            if location is None:
                raise ValueError(f"data.sources.{name}: no data_dir (set data.data_dir or data.sources.{name}.data_dir)")
            manifest = self._manifest(location)
            stored = options.get("source", name)
            if stored not in manifest.source_names():
                raise ManifestError(f"source {stored!r} is not in {manifest.location} (it has "
                                    f"{manifest.source_names()})")
            kind = manifest.source_kind(stored)
            if kind != "image":
                raise ManifestError(f"source {stored!r} in {manifest.location} holds {kind} examples; the image "
                                    "DataModule reads image sources (kind: image) only")
            out.append({"name": name, "manifest": manifest, "source": stored,
                        "weight": float(options.get("weight", 1.0)),
                        "train": manifest.shards(stored, "train"), "val": manifest.shards(stored, "val")})
        if any(s["weight"] < 0 for s in out) or sum(s["weight"] for s in out) <= 0:
            raise ValueError("data.sources weights must be >= 0 and not all 0")
        return out

    def _manifest(self, location: str) -> Manifest:
        resolved = resolve_location(location)
        if resolved not in self.manifests:
            self.manifests[resolved] = Manifest.load(resolved)
        return self.manifests[resolved]

    def _image_token_id(self) -> int:
        ids = {int(s["manifest"].data["sources"][s["source"]]["image_token_id"]) for s in self.sources}
        if len(ids) != 1:
            raise ManifestError(f"the image sources disagree on the <|image|> id ({sorted(ids)}); prepare them with "
                                "one tokenizer")
        return ids.pop()

    # --- dataloaders ------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        """The train mixture for this rank: an endless stream of shuffled passes."""
        return self._loader(self._stream("train", self.batch_size), self.batch_size)

    def val_dataloader(self) -> DataLoader:
        """Every val example once, the same number on every rank."""
        return self._loader(self._stream("val", self.val_batch_size), self.val_batch_size)

    def _stream(self, split: str, batch_size: int) -> ImageStream:
        if self.tiler is None:
            raise RuntimeError("the image DataModule has no tiling: train it with stage=vision_adapter, which sets "
                               "the model's (ImageCaptionDataModule.set_tiler)")
        rank, world = self._rank()
        shards = [(s["train"] if split == "train" else s["val"]) for s in self.sources]
        vocab_limit = self.manifest.vocab_size + NEW_TOKENS
        return ImageStream(shards, [s["weight"] for s in self.sources], split, self.tiler, vocab_limit, rank, world,
                           self.seed + self.train_batches, self.shuffle_buffer, self.on_corrupt_shard)

    def _loader(self, stream: ImageStream, batch_size: int) -> DataLoader:
        return DataLoader(stream, batch_size=batch_size, num_workers=self.num_workers, pin_memory=self.pin_memory,
                          collate_fn=Collate(self.pad_id), persistent_workers=False)

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Take the readers' skip counts out of the batch; count train batches (for the next pass's seed)."""
        self.skipped_images += int(batch.pop(SKIPPED_KEY, torch.zeros(())).sum())
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            self.train_batches += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Train batches consumed (a resumed run seeds its new pass with it) and images skipped."""
        return {"train_batches": self.train_batches, "skipped_images": self.skipped_images}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_batches = int(state.get("train_batches", 0))
        self.skipped_images = int(state.get("skipped_images", 0))


class ImageStream(IterableDataset):
    """Examples of one split as dicts ready for :class:`Collate` (see the module docstring)."""

    def __init__(self, shards: list[list[ShardInfo]], weights: list[float], split: str, tiler: ImageTiler,
                 vocab_limit: int, rank: int, world: int, seed: int, shuffle_buffer: int, on_corrupt: str) -> None:
        self.shards, self.weights, self.split, self.tiler = shards, weights, split, tiler
        self.vocab_limit, self.rank, self.world, self.seed = vocab_limit, rank, world, seed
        self.shuffle_buffer, self.on_corrupt = shuffle_buffer, on_corrupt
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
                raise ShardError("an image source has no readable train examples for this reader; check its shards "
                                 "(or lower data.num_workers x ranks below its number of examples)")
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

    def _rows(self, shard: ShardInfo) -> list[ImageRow]:
        try:
            return read_image_shard(shard, self.vocab_limit)
        except ShardError as err:
            if self.on_corrupt == "error":
                raise
            logger.warning("skipping damaged shard %s: %s", shard.url, err)
            return []

    def _example(self, row: ImageRow, keep_bad: bool) -> dict[str, Any] | None:
        loss_mask = row.loss_mask
        key = f"{row.description.get('id', row.index)}"
        try:
            image = decode_image(row.image, key)
        except BadInputError as err:
            self._skipped += 1
            if self._logged < _LOGGED_SKIPS:
                self._logged += 1
                logger.warning("skipped an image that does not decode (example %d, %s): %s", row.index, key, err)
            if not keep_bad:
                return None
            from PIL import Image

            image = Image.new("RGB", (self.tiler.tile_size, self.tiler.tile_size))
            loss_mask = np.zeros_like(loss_mask)
        tiles = self.tiler(image)
        skipped, self._skipped = self._skipped, 0
        return {"tokens": row.tokens.astype(np.int64), "loss_mask": loss_mask, "pixels": tiles.pixels,
                "aspect_ratio_id": tiles.aspect_ratio_id, SKIPPED_KEY: skipped}


class Collate:
    """Examples -> a batch (see the module docstring); ``pad_id`` pads the token rows."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch, seq = len(examples), max(len(e["tokens"]) for e in examples)
        tokens = torch.full((batch, seq), self.pad_id, dtype=torch.long)
        targets = torch.full((batch, seq), IGNORE_INDEX, dtype=torch.long)
        tiles = max(e["pixels"].shape[0] for e in examples)
        size = examples[0]["pixels"].shape[-1]
        pixels = torch.zeros(batch, tiles, 3, size, size)
        for i, example in enumerate(examples):
            ids, mask = torch.from_numpy(example["tokens"]), torch.from_numpy(np.asarray(example["loss_mask"]))
            tokens[i, : len(ids)] = ids
            targets[i, : len(ids) - 1] = torch.where(mask[1:], ids[1:], IGNORE_INDEX)
            pixels[i, : example["pixels"].shape[0]] = torch.from_numpy(example["pixels"])
        return {
            "tokens": tokens,
            "targets": targets,
            "pixel_values": pixels,
            "aspect_ratio_ids": torch.tensor([e["aspect_ratio_id"] for e in examples], dtype=torch.long),
            "num_tiles": torch.tensor([e["pixels"].shape[0] for e in examples], dtype=torch.long),
            "image_rows": torch.arange(batch, dtype=torch.long),
            SKIPPED_KEY: torch.tensor([e[SKIPPED_KEY] for e in examples], dtype=torch.long),
        }
