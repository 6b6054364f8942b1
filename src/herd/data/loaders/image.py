"""ImageCaptionDataModule: prepared image-caption shards (``herd.data.kinds.image``) as batches for stage=vision_adapter.

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

Sources, the train and val streams, and skips are those of every media kind
(:mod:`herd.data.loaders.media`). An image that fails to decode is skipped, naming its key in a
warning, and counted in :attr:`ImageCaptionDataModule.skipped_images`. In training it is left
out. In validation it stays as a blank image whose targets are all -100.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from herd.data.kinds.image import ImageTiler, decode_image
from herd.data.kinds.media import ExampleRow
from herd.data.loaders.media import MediaDataModule, token_rows
from herd.model.vision import NEW_TOKENS

SKIPPED_KEY = "skipped_images"  # per-batch count of images a reader skipped since its previous batch


class ImageCaptionDataModule(MediaDataModule):
    """Image-caption sources of prepared folders; see the module docstring and :class:`MediaDataModule`."""

    kind = "image"
    skipped_key = SKIPPED_KEY
    new_ids = NEW_TOKENS  # ids past the vocabulary that the vision model embeds (<|image|> first)
    noun = "an image"
    prepare_hint = "make prepare-vision"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.image_token_id = self.source_id("image_token_id", "<|image|>")
        self.tiler: ImageTiler | None = None

    @property
    def skipped_images(self) -> int:
        """Images that failed to decode so far."""
        return self.skipped_media

    def set_tiler(self, tiler: ImageTiler) -> None:
        """The model's tiling (:meth:`ImageTiler.for_model`); needed before any dataloader is made."""
        self.tiler = tiler

    def featurizer(self) -> ImageFeaturizer:
        """Decoding and tiling with the model's tiler."""
        if self.tiler is None:
            raise RuntimeError("the image DataModule has no tiling: train it with stage=vision_adapter, which sets "
                               "the model's (ImageCaptionDataModule.set_tiler)")
        return ImageFeaturizer(self.tiler)

    def collate(self) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        """:class:`Collate` with ``<|end_of_text|>`` padding."""
        return Collate(self.pad_id)


class ImageFeaturizer:
    """A stored example -> its ids, loss mask and the image's tiles."""

    def __init__(self, tiler: ImageTiler) -> None:
        self.tiler = tiler

    def __call__(self, row: ExampleRow, key: str) -> dict[str, Any]:
        """The example with its image tiled; BadInputError when the image does not decode."""
        return self._example(row, decode_image(row.media, key))

    def blank(self, row: ExampleRow) -> dict[str, Any]:
        """The example with a black image of one tile."""
        from PIL import Image

        return self._example(row, Image.new("RGB", (self.tiler.tile_size, self.tiler.tile_size)))

    def _example(self, row: ExampleRow, image) -> dict[str, Any]:
        tiles = self.tiler(image)
        return {"tokens": row.tokens.astype(np.int64), "loss_mask": row.loss_mask, "pixels": tiles.pixels,
                "aspect_ratio_id": tiles.aspect_ratio_id}


class Collate:
    """Examples -> a batch (see the module docstring); ``pad_id`` pads the token rows."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        tokens, targets = token_rows(examples, self.pad_id)
        tiles = max(e["pixels"].shape[0] for e in examples)
        size = examples[0]["pixels"].shape[-1]
        pixels = torch.zeros(len(examples), tiles, 3, size, size)
        for i, example in enumerate(examples):
            pixels[i, : example["pixels"].shape[0]] = torch.from_numpy(example["pixels"])
        return {
            "tokens": tokens,
            "targets": targets,
            "pixel_values": pixels,
            "aspect_ratio_ids": torch.tensor([e["aspect_ratio_id"] for e in examples], dtype=torch.long),
            "num_tiles": torch.tensor([e["pixels"].shape[0] for e in examples], dtype=torch.long),
            "image_rows": torch.arange(len(examples), dtype=torch.long),
            SKIPPED_KEY: torch.tensor([e[SKIPPED_KEY] for e in examples], dtype=torch.long),
        }
