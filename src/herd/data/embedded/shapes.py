"""The embedded image-caption set ``stdlib:shapes``: pictures drawn with Pillow, captions that need the picture.

Each picture shows one, two or three shapes of one kind and one colour on a light background. The
shapes are circles, squares or triangles; the colours are red, green, blue or yellow. Sizes,
places and the background's shade vary. The caption names the count, the colour and the shape,
"two blue triangles" for instance: 36 captions, each as likely as the others. Nothing in the
text predicts the picture's attributes, so a model that does not look at the image can do no
better than about ln 36 = 3.58 nats per caption. A model that looks can get all three right.

Like the stdlib corpus (the inputs named ``stdlib:`` are herd's embedded ones), it needs no
download, and the same options give the same pictures, byte for byte. Options go in a query
string: ``stdlib:shapes?count=4000&seed=0&size=64``.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from herd.data.inputs import int_options

COUNTS = ("one", "two", "three")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (225, 200, 30)}
SHAPES = ("circle", "square", "triangle")
DEFAULTS = {"count": 4000, "seed": 0, "size": 64}
ATTRIBUTES = ("count", "colour", "shape")  # what each caption word names, in order


@dataclass(frozen=True)
class Picture:
    """One rendered example: its id, PNG bytes, caption and the attributes the caption names."""

    id: str
    png: bytes
    caption: str
    attributes: dict[str, str]


def shapes_options(item: str) -> dict[str, int]:
    """The options of a ``stdlib:shapes?...`` input (defaults filled in); ValueError names a bad one."""
    options = int_options(item, DEFAULTS)
    if options["count"] < 1 or options["size"] < 32:
        raise ValueError(f"{item}: count must be >= 1 and size >= 32 pixels")
    return options


def stdlib_shapes(count: int = 4000, seed: int = 0, size: int = 64) -> Iterator[Picture]:
    """``count`` pictures of ``size`` x ``size`` pixels; picture i depends only on (seed, i, size)."""
    for index in range(count):
        yield render(random.Random(f"{seed}:{index}"), f"shapes-{seed}-{index:06d}", size)


def render(rng: random.Random, picture_id: str, size: int) -> Picture:
    """Draw one picture with attributes drawn from ``rng``."""
    from PIL import Image, ImageDraw

    attributes = {"count": rng.choice(COUNTS), "colour": rng.choice(list(COLOURS)), "shape": rng.choice(SHAPES)}
    shade = rng.randint(225, 255)
    image = Image.new("RGB", (size, size), (shade, shade, rng.randint(215, 255)))
    draw = ImageDraw.Draw(image)
    colour = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[attributes["colour"]])
    for box in _places(rng, COUNTS.index(attributes["count"]) + 1, size):
        _draw(draw, attributes["shape"], box, colour)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    caption = f"{attributes['count']} {attributes['colour']} {attributes['shape']}" + (
        "s" if attributes["count"] != "one" else "")
    return Picture(picture_id, out.getvalue(), caption, attributes)


def _places(rng: random.Random, n: int, size: int) -> list[tuple[int, int, int, int]]:
    """``n`` non-overlapping square boxes (x0, y0, x1, y1) inside the picture."""
    boxes: list[tuple[int, int, int, int]] = []
    while len(boxes) < n:
        side = rng.randint(size * 3 // 16, size * 5 // 16)
        x, y = rng.randint(1, size - side - 2), rng.randint(1, size - side - 2)
        box = (x, y, x + side, y + side)
        if all(box[2] + 2 < b[0] or b[2] + 2 < box[0] or box[3] + 2 < b[1] or b[3] + 2 < box[1] for b in boxes):
            boxes.append(box)
    return boxes


def _draw(draw: Any, shape: str, box: tuple[int, int, int, int], colour: tuple[int, ...]) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)


def caption_attributes(caption: str) -> dict[str, str] | None:
    """The attributes a ``stdlib:shapes`` caption names, or None when it is not such a caption."""
    words = caption.strip().split()
    if len(words) != 3 or words[0] not in COUNTS or words[1] not in COLOURS:
        return None
    shape = words[2][:-1] if words[0] != "one" and words[2].endswith("s") else words[2]
    if shape not in SHAPES:
        return None
    return {"count": words[0], "colour": words[1], "shape": shape}
