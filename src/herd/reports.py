"""Markdown reports with PNG figures: what ``herd.pipeline`` and ``herd.scaling`` write as ``report.md``
next to their ``summary.json`` / ``scaling.json``.

A report is plain Markdown (readable as text, rendered by GitHub, VS Code or any Markdown viewer):
tables of the summary's numbers, figures made with matplotlib (Agg, no display needed) saved beside
it, and links relative to the report's folder, so that the folder can be moved or copied whole.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

REPORT_FILE = "report.md"


def number(value: Any) -> str:
    """A table cell: floats to 4 significant digits, large integers with thousands separators, none as -."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def cell(text: Any) -> str:
    """Text that stays in one Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], headers: Sequence[str] | None = None) -> list[str]:
    """A Markdown table of ``rows`` (values formatted by :func:`number` unless already strings)."""
    headers = list(headers or columns)
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        values = [row.get(c) for c in columns]
        lines.append("| " + " | ".join(cell(v if isinstance(v, str) else number(v)) for v in values) + " |")
    return lines


def relative(path: str | os.PathLike[str], base: str | os.PathLike[str]) -> str:
    """``path`` relative to the folder ``base`` (POSIX separators), e.g. ``round2/dpo/export``."""
    return Path(os.path.relpath(Path(path), Path(base))).as_posix()


def link(path: str | os.PathLike[str], base: str | os.PathLike[str], text: str | None = None) -> str:
    """A Markdown link to ``path``, relative to the report's folder ``base``."""
    target = relative(path, base)
    return f"[{text or target}]({quote(target, safe='/+=@,')})"


def code_block(text: str, limit: int = 600) -> list[str]:
    """``text`` as a fenced block (cut after ``limit`` characters), so Markdown leaves it as it is."""
    text = text if len(text) <= limit else text[:limit].rstrip() + " [...]"
    fence = "````" if "```" in text else "```"
    return [f"{fence}text", text, fence]


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only; no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grid(count: int, columns: int = 3, size: tuple[float, float] = (4.4, 3.2)):
    """A figure of ``count`` small axes, ``columns`` to a row; returns (figure, axes list), unused axes hidden."""
    plt = pyplot()
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(size[0] * columns, size[1] * rows), squeeze=False)
    flat = [axis for row in axes for axis in row]
    for axis in flat[count:]:
        axis.set_visible(False)
    return figure, flat[:count]


def save(figure, path: str | os.PathLike[str]) -> Path:
    """Write the figure as a PNG and close it."""
    path = Path(path)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot().close(figure)
    return path


def write(path: str | os.PathLike[str], lines: Iterable[str]) -> Path:
    """Write the report (atomically: a reader never sees half of it)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    temporary.replace(path)
    return path
