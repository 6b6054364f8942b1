"""Evaluation results: one schema for every task, written to ``results.json`` and TensorBoard.

Every measured number is one row with the same seven keys::

    {"model": "logs/pretrain/runs/<run>/export", "task": "mcq", "metric": "accuracy_raw/mean",
     "value": 0.41, "n": 100, "seed": 0, "herd_version": "0.1.0"}

- ``task`` names what was run (``perplexity``, ``needle``, ``mcq``, ``reward_accuracy``);
- ``metric`` names the number inside the task, with ``/`` separating its parts (a source, a
  statistic, a variant): ``loss/code``, ``accuracy_per_char/std``, ``accuracy_raw/labels=none``;
- ``n`` is how many things the value averages (tokens for a loss, items for an accuracy); the
  ``excluded`` metric of a set (``herd.evaluate exclude=...``) counts the items left out, of ``n``;
- ``seed`` is the evaluation's seed, ``herd_version`` the version of herd that measured it.

``results.json`` holds ``{"schema": "herd.evaluate/1", "model": ..., "seed": ...,
"herd_version": ..., "created": ..., "results": [rows], "skipped": [{"task", "reason"}]}``.
New tasks and metrics add rows; the keys of a row never change within a schema version.
:func:`compare_table` lines up the rows of several such files side by side.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import herd

SCHEMA = "herd.evaluate/1"
ROW_KEYS = ("model", "task", "metric", "value", "n", "seed", "herd_version")


@dataclass(frozen=True)
class Result:
    """One measured number (see the module docstring for the meaning of each field)."""

    model: str
    task: str
    metric: str
    value: float
    n: int
    seed: int
    herd_version: str = herd.__version__


@dataclass
class Results:
    """The rows of one evaluation of one model, and the tasks it skipped with the reason."""

    model: str
    seed: int
    rows: list[Result] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def add(self, task: str, metric: str, value: float, n: int) -> Result:
        """Append a row for this model and seed; returns it."""
        row = Result(self.model, task, metric, float(value), int(n), self.seed)
        self.rows.append(row)
        return row

    def skip(self, task: str, reason: str) -> None:
        """Record that ``task`` did not run, and why."""
        self.skipped.append({"task": task, "reason": reason})

    def value(self, task: str, metric: str) -> float:
        """The value of one row (KeyError naming it when absent)."""
        for row in self.rows:
            if row.task == task and row.metric == metric:
                return row.value
        raise KeyError(f"no result {task}/{metric} for {self.model}")

    def to_dict(self) -> dict[str, Any]:
        """The ``results.json`` content."""
        return {
            "schema": SCHEMA,
            "model": self.model,
            "seed": self.seed,
            "herd_version": herd.__version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "results": [asdict(row) for row in self.rows],
            "skipped": list(self.skipped),
        }

    def write_json(self, path: str | Path) -> Path:
        """Write ``results.json`` (non-finite values as ``null``, which JSON can hold)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        content = self.to_dict()
        for row in content["results"]:
            if not math.isfinite(row["value"]):
                row["value"] = None
        path.write_text(json.dumps(content, indent=2) + "\n")
        return path

    def write_tensorboard(self, log_dir: str | Path, step: int = 0) -> Path:
        """One scalar per row, tagged ``<task>/<metric>``, at ``step``, in ``log_dir``."""
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(log_dir))
        try:
            for row in self.rows:
                if math.isfinite(row.value):
                    writer.add_scalar(f"{row.task}/{row.metric}", row.value, global_step=step)
        finally:
            writer.close()
        return Path(log_dir)


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a ``results.json``, checking its schema and the keys of every row."""
    path = Path(path)
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist; give the results.json that herd.evaluate wrote") from None
    except ValueError as err:
        raise ValueError(f"{path} is not JSON ({err}); give the results.json that herd.evaluate wrote") from None
    if not isinstance(content, dict) or content.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a herd.evaluate results file (schema {SCHEMA!r} expected, found "
                         f"{content.get('schema') if isinstance(content, dict) else type(content).__name__!r})")
    for index, row in enumerate(content.get("results", [])):
        missing = [key for key in ROW_KEYS if key not in row]
        if missing:
            raise ValueError(f"{path}: result {index} lacks {missing}")
    return content


def compare_table(files: Sequence[dict[str, Any]], names: Sequence[str] | None = None) -> str:
    """The rows of several loaded ``results.json`` files side by side, one line per (task, metric).

    Columns are the files in the given order, headed by ``names`` (default: each file's model);
    with two files a last column gives the difference (second minus first). A metric one file
    lacks is shown as ``-``. Rows keep the order in which they first appear.
    """
    names = list(names) if names is not None else [str(f.get("model", f"file {i}")) for i, f in enumerate(files)]
    keys: list[tuple[str, str]] = []
    values: list[dict[tuple[str, str], float | None]] = []
    for content in files:
        found = {}
        for row in content.get("results", []):
            key = (row["task"], row["metric"])
            if key not in keys:
                keys.append(key)
            found[key] = row["value"]
        values.append(found)
    headers = ["task", "metric", *_short_names(names)]
    if len(files) == 2:
        headers.append("difference")
    lines = []
    for key in keys:
        cells = [_number(found.get(key)) for found in values]
        if len(files) == 2:
            first, second = values[0].get(key), values[1].get(key)
            both = first is not None and second is not None
            cells.append(_number(second - first, signed=True) if both else "-")
        lines.append([*key, *cells])
    return _aligned([headers, *lines])


def _short_names(names: Iterable[str]) -> list[str]:
    """Model paths shortened to their last two parts (``<run>/export``)."""
    return ["/".join(Path(name).parts[-2:]) if "/" in name else name for name in names]


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:+.3e}" if signed else f"{value:.3e}"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _aligned(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for index, row in enumerate(rows):
        text = [cell.ljust(width) if i < 2 else cell.rjust(width) for i, (cell, width) in enumerate(zip(row, widths,
                                                                                                       strict=True))]
        out.append("  ".join(text).rstrip())
        if index == 0:
            out.append("  ".join("-" * width for width in widths))
    return "\n".join(out)
