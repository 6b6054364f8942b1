"""Image-caption sources for ``herd.prepare`` (``kind: image``), their shards, and Llama 3.2 Vision's tiling.

Inputs of a source with ``kind: image`` (the embedded ``stdlib:shapes`` is one):

- a folder: every image file matching the source's ``glob`` (default ``**/*``) whose suffix is
  one of :data:`IMAGE_SUFFIXES`, with its caption in the ``.txt`` file of the same name beside
  it (``cat.png`` + ``cat.txt``). The example's id is the image's path relative to the folder.
- a jsonl file: one example per line, ``{"image": "path", "caption": "..."}``, optionally with
  ``"prompt"`` (replaces the source's), ``"id"`` and ``"group"`` (strings; the split is then
  assigned by hashing the group). A relative image path is taken from the jsonl's folder. The
  default id is ``file:line``.
- ``stdlib:shapes``: pictures drawn with Pillow (:mod:`herd.data.image_set`).

Every image is decoded when prepared. An input that is not usable is a
:class:`~herd.data.sources.BadInputError` naming it, with a reason of :data:`BAD_INPUT_REASONS`
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

import hashlib
import io
import json
import logging
import os
import tarfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from herd.data.image_set import shapes_options, stdlib_shapes
from herd.data.kinds import BadInputs, Job, PrepareError, SourceSpec, assign_split
from herd.data.shards import LAYOUTS, SPLITS, ShardError, ShardInfo, _member, token_dtype
from herd.data.sources import BadInputError, OnBadInput, folder_files, jsonl_records

if TYPE_CHECKING:
    from herd.data.tokenizer import Tokenizer
    from herd.model.vision import VisionConfig

logger = logging.getLogger(__name__)

STDLIB_SHAPES = "stdlib:shapes"
IMAGE_TOKEN = "<|image|>"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp")
BAD_INPUT_REASONS = (
    "not_utf8", "malformed_json", "not_an_object",
    "missing_image", "unreadable_image", "corrupt_image", "no_caption", "empty_caption", "bad_field",
)  # fmt: skip
NEW_TOKENS = 8  # ids past the vocabulary a vision model embeds (herd.model.vision.NEW_TOKENS)
MAX_PIXELS = 64_000_000  # larger images are refused as corrupt (Pillow's decompression-bomb guard)
_FORMATS = {"PNG": "png", "JPEG": "jpeg", "GIF": "gif", "WEBP": "webp", "BMP": "bmp"}


# --- examples -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageExample:
    """One image and its caption, before decoding: ``read()`` returns the image file's bytes."""

    id: str
    caption: str
    read: Callable[[], bytes]
    prompt: str | None = None
    group: str | None = None

    @property
    def split_key(self) -> str:
        """What the split is assigned by: the group when there is one, else the id."""
        return self.group if self.group is not None else self.id


def iter_examples(inputs: list[str], glob: str, on_bad_input: OnBadInput) -> Iterator[ImageExample]:
    """The examples of a source's inputs in order; bad captions and jsonl lines go to ``on_bad_input``."""
    for item in inputs:
        if item == STDLIB_SHAPES or item.startswith(STDLIB_SHAPES + "?"):
            try:
                options = shapes_options(item)
            except ValueError as err:
                raise PrepareError(str(err)) from None
            for picture in stdlib_shapes(**options):
                yield ImageExample(picture.id, picture.caption, lambda png=picture.png: png)
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            yield from _folder_examples(path, glob, on_bad_input)
        elif path.is_file() and path.suffix.lower() in (".jsonl", ".ndjson"):
            yield from _jsonl_examples(path, on_bad_input)
        elif path.is_file():
            raise PrepareError(f"image input {path} is neither a folder of images with .txt captions nor a .jsonl file")
        else:
            raise FileNotFoundError(f"input not found: {path}. Give a folder of images with .txt captions, a .jsonl "
                                    f"of image paths and captions, or {STDLIB_SHAPES!r}")


def _folder_examples(folder: Path, glob: str, on_bad_input: OnBadInput) -> Iterator[ImageExample]:
    images = [p for p in folder_files(folder, glob) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) match {glob!r} in {folder}")
    for image in images:
        key = str(image.relative_to(folder))
        caption_file = image.with_suffix(".txt")
        try:
            if not caption_file.is_file():
                raise BadInputError(f"{image}: no caption file {caption_file.name} beside it", "no_caption", key)
            caption = _read_caption(caption_file, key)
        except BadInputError as err:
            on_bad_input(err)
            continue
        yield ImageExample(key, caption, lambda path=image: _read_image_file(path))


def _jsonl_examples(path: Path, on_bad_input: OnBadInput) -> Iterator[ImageExample]:
    for line, record in jsonl_records(path, on_bad_input, "'image' and 'caption'"):
        where = f"{path}:{line}"
        try:
            example = _record_example(record, path.parent, where)
        except BadInputError as err:
            on_bad_input(err)
            continue
        yield example


def _record_example(record: Mapping[str, Any], folder: Path, where: str) -> ImageExample:
    for key in ("image", "caption"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            reason = "no_caption" if key == "caption" and key not in record else "bad_field"
            raise BadInputError(f"{where}: {key!r} must be a non-empty string", reason, where)
    for key in ("prompt", "id", "group"):
        if key in record and not isinstance(record[key], str):
            raise BadInputError(f"{where}: {key!r} must be a string", "bad_field", where)
    image = Path(record["image"]).expanduser()
    image = image if image.is_absolute() else folder / image
    return ImageExample(record.get("id") or where, record["caption"].strip(),
                        lambda: _read_image_file(image, where), record.get("prompt"), record.get("group"))


def _read_caption(path: Path, key: str) -> str:
    try:
        caption = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise BadInputError(f"{path}: the caption is not UTF-8 text", "not_utf8", key) from None
    if not caption:
        raise BadInputError(f"{path}: the caption is empty", "empty_caption", key)
    return caption


def _read_image_file(path: Path, where: str | None = None) -> bytes:
    where = where or str(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BadInputError(f"{where}: image {path} does not exist", "missing_image", where) from None
    except OSError as err:
        raise BadInputError(f"{where}: image {path} cannot be read ({err})", "unreadable_image", where) from None


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
    ids = [image_id, tokenizer.bos_id, *encoding.ids, tokenizer.eos_id]
    return np.asarray(ids, np.uint32), np.asarray([False, False, *in_caption, True], bool)


# --- the kind -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Encoded:
    """A checked example, its image bytes spooled to disk at ``offset`` (``size`` bytes)."""

    id: str
    prompt: str
    caption: str
    ids: np.ndarray
    loss_mask: np.ndarray
    format: str
    offset: int
    size: int


class ImageKind:
    """Images with captions, one example per sample; see the module docstring."""

    name = "image"
    options: Mapping[str, Any] = {"glob": "**/*", "prompt": ""}
    on_bad_input = "skip"
    max_bad_fraction = 0.1

    def check(self, spec: SourceSpec) -> None:
        """``prompt`` must be a string."""
        if not isinstance(spec.options["prompt"], str):
            raise PrepareError(f"sources.{spec.name}.prompt must be a string, got {spec.options['prompt']!r}")

    def texts(self, spec: SourceSpec, val_fraction: float, on_bad_input: BadInputs) -> Iterator[str]:
        """The captions (and prompts) of the train examples, to train a tokenizer on."""
        for example in iter_examples(spec.inputs, str(spec.options["glob"]), on_bad_input):
            if assign_split(example.split_key, val_fraction) == "train":
                yield example.caption
                if example.prompt or spec.options["prompt"]:
                    yield example.prompt or spec.options["prompt"]

    def prepare(self, spec: SourceSpec, job: Job, bad_inputs: BadInputs) -> dict[str, Any]:
        """Check, encode and spool every example, then write each split's shards."""
        image_id = image_token_id(job.tokenizer)
        encoded: dict[str, list[_Encoded]] = {split: [] for split in SPLITS}
        spools = {split: open(job.scratch / f"{spec.name}.{split}.images", "w+b") for split in SPLITS}  # noqa: SIM115
        read = too_long = 0
        task = job.progress.add_task(f"encode {spec.name}", total=None)
        try:
            for example in iter_examples(spec.inputs, str(spec.options["glob"]), bad_inputs):
                read += 1
                try:
                    data = example.read()
                    decode_image(data, example.id)
                except BadInputError as err:
                    bad_inputs(err)
                    read -= 1  # counted as a bad input, not as an example read
                    continue
                prompt = example.prompt if example.prompt is not None else str(spec.options["prompt"])
                ids, mask = encode_example(job.tokenizer, image_id, prompt, example.caption)
                if len(ids) > job.seq_len:
                    too_long += 1
                    continue
                split = assign_split(example.split_key, job.val_fraction)
                spool = spools[split]
                offset = spool.seek(0, os.SEEK_END)
                spool.write(data)
                encoded[split].append(_Encoded(example.id, prompt, example.caption, ids, mask, image_format(data),
                                               offset, len(data)))
                if read % 1000 == 0:
                    job.progress.update(task, description=f"encode {spec.name}: {read:,} images")
            bad_inputs.check(read, f"check sources.{spec.name}.input (images with .txt captions, or jsonl lines of "
                                   "'image' and 'caption')")
            kept = sum(len(examples) for examples in encoded.values())
            if kept == 0:
                raise PrepareError(f"source {spec.name}: no example fits seq_len = {job.seq_len} tokens "
                                   f"({too_long} too long); raise seq_len")
            dtype = token_dtype(max(job.tokenizer.vocab_size, image_id + 1))
            splits = {split: write_image_split(job.out, f"{spec.name}/{split}", encoded[split], spools[split], dtype,
                                               job.max_rows, job.min_count) for split in SPLITS}
        finally:
            for spool in spools.values():
                spool.close()
        return {
            "kind": self.name,
            "layout": LAYOUTS[self.name],
            "inputs": spec.inputs,
            "image_token_id": image_id,
            "examples": kept,
            "tokens": sum(s["tokens"] for s in splits.values()),
            "trained_tokens": sum(s["trained_tokens"] for s in splits.values()),
            "too_long": too_long,
            "skipped": bad_inputs.skipped,
            "splits": splits,
        }

    def summary(self, name: str, entry: Mapping[str, Any]) -> str:
        """``name: N images, T tokens (A trained); D too long; train/val examples``."""
        train, val = entry["splits"]["train"], entry["splits"]["val"]
        return (f"{name}: {entry['examples']} images with captions, {entry['tokens']} tokens "
                f"({entry['trained_tokens']} trained); {entry['too_long']} too long, dropped; train "
                f"{train['examples']} in {len(train['shards'])} shards, val {val['examples']} in "
                f"{len(val['shards'])} shards")


def write_image_split(folder: Path, prefix: str, examples: list[_Encoded], spool, dtype: np.dtype, max_rows: int,
                      min_count: int) -> dict[str, Any]:
    """Write ``examples`` as ``<prefix>-NNNNNN.tar`` shards; returns the split's manifest entry."""
    per_shard = max(1, min(max_rows, -(-len(examples) // min_count)))
    shards = []
    for index, first in enumerate(range(0, len(examples), per_shard)):
        chunk = examples[first : first + per_shard]
        parts: list[bytes] = []
        for number, example in enumerate(chunk, start=first):
            key = f"{number:09d}"
            spool.seek(example.offset)
            description = {"id": example.id, "prompt": example.prompt, "caption": example.caption}
            parts += _member(f"{key}.tokens.npy", _npy(example.ids.astype(dtype)))
            parts += _member(f"{key}.loss_mask.npy", _npy(example.loss_mask.astype(np.uint8)))
            parts += _member(f"{key}.image.{example.format}", spool.read(example.size))
            parts += _member(f"{key}.json", json.dumps(description, sort_keys=True).encode("utf-8"))
        parts.append(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
        parts.append(tarfile.NUL * (-sum(map(len, parts)) % tarfile.RECORDSIZE))
        data = b"".join(parts)
        path = folder / f"{prefix}-{index:06d}.tar"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        shards.append({"path": f"{prefix}-{index:06d}.tar", "rows": len(chunk), "first_row": first,
                       "sha256": hashlib.sha256(data).hexdigest()})
    return {"examples": len(examples), "tokens": int(sum(len(e.ids) for e in examples)),
            "trained_tokens": int(sum(int(e.loss_mask.sum()) for e in examples)), "shards": shards}


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(array), allow_pickle=False)
    return out.getvalue()


IMAGE = ImageKind()


# --- reading --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRow:
    """One stored example: its index in the split, ids, loss mask, image bytes and description."""

    index: int
    tokens: np.ndarray
    loss_mask: np.ndarray
    image: bytes
    description: dict[str, Any]


def read_image_shard(shard: ShardInfo, vocab_limit: int) -> list[ImageRow]:
    """Every example of an image shard, checked (sha256, members, dtypes, id range); ShardError names the shard.

    ``vocab_limit`` is one past the largest valid id (the vocabulary plus the vision model's new
    ids). Images are not decoded here: :func:`decode_image` does that when an example is used.
    """
    from herd.data.shards import _fetch, _load_npy, _samples

    data = _fetch(shard.url)
    if shard.sha256 is not None and hashlib.sha256(data).hexdigest() != shard.sha256:
        raise ShardError(f"shard {shard.url} is corrupt or truncated: its sha256 differs from the manifest's. Re-run "
                         "herd.prepare or restore the file (or set on_corrupt_shard=skip to skip it).")
    try:
        rows = [_decode_row(sample, vocab_limit, _load_npy) for sample in _samples(data, shard.url)]
    except ShardError:
        raise
    except Exception as err:  # tarfile and numpy raise many kinds on damaged bytes
        raise ShardError(f"shard {shard.url} is corrupt or truncated: {err}") from err
    expected = list(range(shard.first_row, shard.first_row + shard.rows))
    if [row.index for row in rows] != expected:
        raise ShardError(f"shard {shard.url} is truncated or altered: it holds {len(rows)} examples but the manifest "
                         f"lists {shard.rows}")
    return rows


def _decode_row(sample: dict[str, Any], vocab_limit: int, load_npy) -> ImageRow:
    key, url = sample["__key__"], sample["__url__"]
    images = [name for name in sample if name.startswith("image.")]
    missing = [name for name in ("tokens.npy", "loss_mask.npy", "json") if name not in sample]
    if missing or len(images) != 1 or not key.isdigit():
        raise ShardError(f"sample {key!r} in {url} is malformed (missing {missing or 'its image'})")
    tokens, mask = load_npy(sample["tokens.npy"], key, url), load_npy(sample["loss_mask.npy"], key, url)
    if tokens.ndim != 1 or tokens.dtype.kind != "u" or mask.shape != tokens.shape or mask.dtype != np.uint8:
        raise ShardError(f"sample {key} in {url}: expected 1-D unsigned ids and a uint8 mask of the same length, got "
                         f"{tokens.dtype}{tokens.shape} and {mask.dtype}{mask.shape}")
    if tokens.size and int(tokens.max()) >= vocab_limit:
        raise ShardError(f"sample {key} in {url}: token id {int(tokens.max())} >= {vocab_limit} (vocabulary and new "
                         "ids): the shards were made with another tokenizer")
    try:
        description = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError) as err:
        raise ShardError(f"sample {key} in {url}: its json member is not JSON ({err})") from None
    return ImageRow(int(key), tokens, mask.astype(bool), sample[images[0]], description)


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
