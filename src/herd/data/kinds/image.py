"""Image-caption sources for ``herd.prepare`` (``kind: image``), their shards, and Llama 3.2 Vision's tiling.

Inputs of a source with ``kind: image`` (the embedded ``stdlib:shapes`` is one):

- a folder: every image file matching the source's ``glob`` (default ``**/*``) whose suffix is
  one of :data:`IMAGE_SUFFIXES`, with its caption in the ``.txt`` file of the same name beside
  it (``cat.png`` + ``cat.txt``). The example's id is the image's path relative to the folder.
- a jsonl file: one example per line, ``{"image": "path", "caption": "..."}``, optionally with
  ``"prompt"`` (replaces the source's), ``"id"`` and ``"group"`` (strings; the split is then
  assigned by hashing the group). A relative image path is taken from the jsonl's folder. The
  default id is ``file:line``.
- ``stdlib:shapes``: pictures drawn with Pillow (:mod:`herd.data.embedded.shapes`).

The inputs, bad-input checks, prepare loop and shards are those of every media kind
(:mod:`herd.data.kinds.media`); this module adds what is the images' own. Every image is decoded when
prepared (in the worker processes). An input that is not usable is a
:class:`~herd.data.inputs.BadInputError` naming it, with a reason of :data:`BAD_INPUT_REASONS`
(an image that is missing, unreadable or corrupt; a missing or empty caption; a bad jsonl line).
By default such inputs are skipped and counted (``on_bad_input``), and prepare fails when more
than ``max_bad_fraction`` (0.1) of a source's inputs are bad.

An example is encoded in Llama 3.2 Vision's base layout:
``<|image|> <|begin_of_text|> prompt+caption <|end_of_text|>``. The prompt and the caption are
joined as they are and tokenized as one text (a prompt that should end in a space must hold it:
``"A picture of "``). ``loss_mask`` is true on the caption's tokens and the closing
``<|end_of_text|>``. ``<|image|>`` is the tokenizer's own
token when it has one (a Llama 3.2 Vision tokenizer), else the id after the last id
(``vocab_size``). Either way it is the model's first new embedding row, and the manifest
records it as ``image_token_id``. An example longer than ``seq_len`` tokens is dropped and
counted (``too_long``).

Shards (the ``image`` layout of ``herd.data.shards.LAYOUTS``) hold one sample per example:
``<key>.tokens.npy`` (unsigned ids), ``<key>.loss_mask.npy`` (uint8), ``<key>.image.<format>``
(the image file's bytes, as given: png, jpeg, ...) and ``<key>.json`` (id, prompt, caption).
Readers check every shard against its sha256 and every sample's members. An image that fails to
decode is skipped and counted, naming its key: such an image never stops training halfway
through a pass.

Tiling (:class:`ImageTiler`) happens when images are read, so the same shards serve any tile
size. It uses ``transformers``' PIL/numpy ``MllamaImageProcessor``. An image is resized to the
best grid of at most ``max_num_tiles`` tiles for its aspect ratio, padded, normalised and cut
into its tiles; its tile count is its own.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from herd.data.embedded.shapes import shapes_options, stdlib_shapes
from herd.data.inputs import BadInputError, OnBadInput
from herd.data.kinds import PrepareError
from herd.data.kinds.media import Loaded, MediaExample, MediaFields, MediaKind, bad_input_reasons, given

if TYPE_CHECKING:
    from herd.data.tokenizer import Tokenizer
    from herd.model.vision import VisionConfig

STDLIB_SHAPES = "stdlib:shapes"
IMAGE_TOKEN = "<|image|>"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp")
FIELDS = MediaFields(media="image", text="caption", suffixes=IMAGE_SUFFIXES, files="images", embedded=STDLIB_SHAPES)
BAD_INPUT_REASONS = bad_input_reasons(FIELDS)
MAX_PIXELS = 64_000_000  # larger images are refused as corrupt (Pillow's decompression-bomb guard)
_FORMATS = {"PNG": "png", "JPEG": "jpeg", "GIF": "gif", "WEBP": "webp", "BMP": "bmp"}


def iter_examples(inputs: list[str], glob: str, on_bad_input: OnBadInput) -> Iterator[MediaExample]:
    """The examples of an image source's inputs in order (``text`` is the caption)."""
    return IMAGE.examples(inputs, glob, on_bad_input)


def decode_image(data: bytes, where: str):
    """The RGB Pillow image of an image file's bytes; BadInputError ``corrupt_image`` naming ``where`` otherwise."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                probe.verify()  # checksums and structure; the image must be opened again afterwards
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_PIXELS:
                raise ValueError(f"{image.width}x{image.height} pixels is more than {MAX_PIXELS}")
            image.load()
            return image.convert("RGB")
    except Exception as err:  # Pillow raises many kinds for damaged files
        raise BadInputError(f"{where}: not a readable image ({type(err).__name__}: {err})", "corrupt_image",
                            where) from None


def image_format(data: bytes) -> str:
    """The file suffix (``png``, ``jpeg``, ...) of a decodable image's bytes."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return _FORMATS.get(image.format or "", "png")


def image_token_id(tokenizer: Tokenizer) -> int:
    """``<|image|>``'s id: the tokenizer's own, else the first id past its vocabulary."""
    own = tokenizer.backend.token_to_id(IMAGE_TOKEN)
    return int(own) if own is not None else tokenizer.vocab_size


def encode_example(tokenizer: Tokenizer, image_id: int, prompt: str, caption: str) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, loss_mask)`` of ``<|image|> <|begin_of_text|> prompt+caption <|end_of_text|>``.

    The prompt and the caption are tokenized as one text, as the model reads them. The mask covers
    the tokens that end inside the caption (a token across the junction counts as the caption's)
    and the closing token.
    """
    encoding = tokenizer.backend.encode(prompt + caption, add_special_tokens=False)
    in_caption = [end > len(prompt) for _, end in encoding.offsets]
    ids = [image_id, *tokenizer.with_bos(encoding.ids), tokenizer.eos_id]
    return np.asarray(ids, np.uint32), np.asarray([False, False, *in_caption, True], bool)


# --- the kind -------------------------------------------------------------------------------------


class ImageKind(MediaKind):
    """Images with captions, one example per sample; see the module docstring."""

    name = "image"
    fields = FIELDS

    def embedded(self, item: str) -> Iterator[MediaExample]:
        """The pictures of ``stdlib:shapes?...``."""
        try:
            options = shapes_options(item)
        except ValueError as err:
            raise PrepareError(str(err)) from None
        for picture in stdlib_shapes(**options):
            yield MediaExample(picture.id, picture.caption, given(picture.png))

    def load(self, example: MediaExample, options: Mapping[str, Any]) -> Loaded:
        """The image file's bytes as given, once they decode."""
        data = example.read()
        decode_image(data, example.id)
        return Loaded(data, image_format(data))

    def encode(self, tokenizer: Tokenizer, prompt: str, text: str) -> tuple[np.ndarray, np.ndarray]:
        """:func:`encode_example` with the tokenizer's ``<|image|>``."""
        return encode_example(tokenizer, image_token_id(tokenizer), prompt, text)

    def token_ids(self, tokenizer: Tokenizer) -> dict[str, int]:
        """``image_token_id`` for the manifest."""
        return {"image_token_id": image_token_id(tokenizer)}


IMAGE = ImageKind()


# --- tiling ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiles:
    """An image cut into tiles: ``pixels`` (num_tiles, 3, size, size) float32, its aspect-ratio id."""

    pixels: np.ndarray
    aspect_ratio_id: int

    @property
    def num_tiles(self) -> int:
        return int(self.pixels.shape[0])


class ImageTiler:
    """Llama 3.2 Vision's tiling with ``transformers``' PIL/numpy ``MllamaImageProcessor``.

    Only the image's own tiles are kept: the processor pads every image to ``max_num_tiles``,
    and the model pads again only when its config asks for it.
    """

    def __init__(self, tile_size: int, max_num_tiles: int, image_mean, image_std) -> None:
        from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

        self.tile_size, self.max_num_tiles = tile_size, max_num_tiles
        self.processor = MllamaImageProcessorPil(size={"height": tile_size, "width": tile_size},
                                                 max_image_tiles=max_num_tiles, image_mean=list(image_mean),
                                                 image_std=list(image_std))

    @classmethod
    def for_model(cls, vision: VisionConfig) -> ImageTiler:
        """The tiling a vision model's config describes."""
        return cls(vision.image_size, vision.max_num_tiles, vision.image_mean, vision.image_std)

    def __call__(self, image) -> Tiles:
        """Tiles of an RGB Pillow image."""
        out = self.processor([[image]])
        count = int(out["num_tiles"][0][0])
        return Tiles(np.ascontiguousarray(out["pixel_values"][0, 0, :count]), int(out["aspect_ratio_ids"][0, 0]))
