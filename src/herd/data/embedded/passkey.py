"""``stdlib:passkey``: synthetic long-context retrieval documents (the needle-in-a-haystack format).

A window of stdlib prose or code with a pass key hidden at a random depth, asked for at the end,
100 to 7K characters of haystack with as many tokens at every length scale. For long-context
training of small models. Options go in a query string:
``stdlib:passkey?min_chars=2500&max_chars=7000&documents=4000&seed=1``. The needle's words are
defined here, and the needle evaluation (:mod:`herd.evaluation.needle`) asks with the same words.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from herd.data.embedded.corpus import stdlib_code, stdlib_prose
from herd.data.inputs import Document, query_options

STDLIB_PASSKEY = "stdlib:passkey"
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


_PASSKEY_OPTIONS = {"documents": int, "min_chars": int, "max_chars": int, "seed": int}


def passkey_options(item: str) -> dict[str, Any]:
    """Keyword arguments of :func:`stdlib_passkey` from ``stdlib:passkey?min_chars=2500&documents=4000``."""
    options = query_options(item, _PASSKEY_OPTIONS)
    chars = (options.pop("min_chars", 100), options.pop("max_chars", 7000))
    return {**options, "chars": chars}


def stdlib_passkey(root: Path | None = None, documents: int = 20000, chars: tuple[int, int] = (100, 7000),
                   seed: int = 0) -> Iterator[Document]:
    """Retrieval documents: a haystack with a hidden pass key, then the question that asks for it.

    ``documents`` haystacks are windows of the stdlib's prose and code (alternately) at random
    offsets, deterministic for a given stdlib, ``chars`` and ``seed`` (a larger ``documents``
    only appends). A haystack's length in characters has density proportional to
    ``1/length**2`` over ``chars``: every doubling of length holds the same number of tokens, so
    a model sees many short retrievals (which teach it to copy the key at all) and as many
    tokens of long ones (which teach it to copy from far away).
    """
    import random

    low, high = chars
    if not 0 < low <= high:
        raise ValueError(f"stdlib_passkey: chars={chars} must be (min, max) with 0 < min <= max")
    if documents <= 0:
        raise ValueError(f"stdlib_passkey: documents={documents} must be positive")
    prose = "\n\n".join(d.text for d in stdlib_prose(root) if d.text.strip())
    code = "\n\n".join(d.text for d in stdlib_code(root) if d.text.strip())
    rng = random.Random(seed)
    for index in range(documents):
        source = prose if index % 2 == 0 else code
        target = min(len(source), round(1 / rng.uniform(1 / high, 1 / low)))
        start = rng.randrange(0, len(source) - target + 1)
        haystack = source[start : start + target]
        cut = haystack.rfind(" ", 0, int(rng.random() * len(haystack))) + 1
        key = rng.randrange(10000, 100000)
        text = haystack[:cut] + NEEDLE.format(key=key).lstrip() + " " + haystack[cut:] + QUESTION + f" {key}."
        yield Document(f"passkey/{index:06d}", text)
