"""Scalars as TensorBoard shows them: nested summaries flattened to ``a/b`` tags, and event files read back.

``herd.rejection_sample`` writes its statistics as scalars (:func:`flat_scalars`), which
``herd.pipeline`` also keeps as a step's metrics; ``herd.pipeline`` reads a training run's
``val/*`` scalars and ``herd.scaling`` a rung's last ``val/loss`` from their event files
(:func:`read_scalars`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple


class Scalar(NamedTuple):
    """One logged value of a tag."""

    step: int
    wall_time: float
    value: float


def flat_scalars(summary: dict[str, Any]) -> dict[str, float]:
    """The numbers of a nested summary as ``a/b`` keys (booleans, strings and None are left out)."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            out |= {f"{key}/{k}": v for k, v in flat_scalars(value).items()}
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def read_scalars(folder: str | Path) -> dict[str, list[Scalar]]:
    """Every scalar tag of the event files in ``folder`` (not its subfolders), each tag's values
    ordered by (step, wall time); all values are kept. A folder without events gives {}."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # its directory watcher talks at INFO
    events = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
    events.Reload()
    return {tag: sorted((Scalar(e.step, e.wall_time, float(e.value)) for e in events.Scalars(tag)),
                        key=lambda s: (s.step, s.wall_time))
            for tag in events.Tags().get(SCALARS, [])}
