"""Helpers for the curation tests: documents made in the test, one block run on them, stdlib text."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

from herd.curation.blocks import Block, Verdict
from herd.curation.documents import Document
from herd.data.embedded.corpus import module_docstrings

_VOCABULARY = """river stone light garden window paper music silver market winter yellow forest engine basket
candle doctor island ladder mirror number orange pencil planet rocket school shadow summer table ticket valley
violin wallet whistle anchor bridge castle dragon feather hammer jacket kettle lemon marble needle ocean parrot
quartz rabbit saddle tiger umbrella velvet walnut"""
WORDS = tuple(_VOCABULARY.split())


def documents(texts: list[str], source: str = "web", **metadata) -> list[Document]:
    """Documents ``<source>/<i>`` with ``metadata["source"]`` (and ``tokens``: their word count)."""
    return [Document(text=text, id=f"{source}/{i}", metadata={"source": source, "tokens": len(text.split()),
                                                               **metadata}) for i, text in enumerate(texts)]


def random_text(seed: int, words: int = 200) -> str:
    """``words`` words drawn from a small vocabulary: texts that share words but no long n-grams."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def edit_words(text: str, positions: list[int], replacement: str = "zebra") -> str:
    """``text`` with the words at ``positions`` replaced."""
    words = text.split()
    for position in positions:
        words[position] = f"{replacement}{position}"
    return " ".join(words)


def run_block(block: Block, docs: list[Document], work: Path) -> list[Verdict]:
    """Every verdict of ``block`` on ``docs`` (read as many times as the block wants)."""
    work.mkdir(parents=True, exist_ok=True)
    return list(block.run(lambda: iter(docs), work))


def removed_ids(verdicts: list[Verdict]) -> set[str]:
    """Ids of the documents a block removed."""
    return {v.doc.id for v in verdicts if v.kept is None}


def stdlib_docstrings(*modules: str) -> list[str]:
    """The docstrings of stdlib modules, one text per module: real English prose."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [module_docstrings((stdlib / f"{name}.py").read_text(), name) for name in modules]


def stdlib_paragraphs(*modules: str, min_words: int = 30) -> list[str]:
    """Paragraphs of at least ``min_words`` words from the docstrings of ``modules``."""
    return [p for text in stdlib_docstrings(*modules) for p in text.split("\n\n") if len(p.split()) >= min_words]


def stdlib_code_chunks(*modules: str, lines: int = 30) -> list[str]:
    """Chunks of ``lines`` lines of stdlib sources: real code (chunks holding docstrings, prose, left out)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks = []
    for name in modules:
        source = (stdlib / f"{name}.py").read_text().splitlines()
        chunks += ["\n".join(source[i:i + lines]) for i in range(0, len(source) - lines, lines)]
    return [chunk for chunk in chunks if chunk.strip() and '"""' not in chunk and "'''" not in chunk]


PLAIN_MODULES = ("argparse", "textwrap", "heapq", "fractions", "statistics", "calendar", "difflib", "functools",
                 "csv", "random", "string", "shlex", "pprint", "inspect", "ftplib", "imaplib")


def plain_prose(*modules: str, min_words: int = 20) -> list[str]:
    """Docstring paragraphs without code in them (no indented lines, doctests, tables or definitions)."""
    return [p for p in stdlib_paragraphs(*(modules or PLAIN_MODULES), min_words=min_words)
            if not any(line.startswith(" ") for line in p.splitlines())
            and not any(mark in p for mark in (">>>", "==", "def "))]
