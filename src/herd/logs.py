"""herd's own messages, and the Lightning warnings herd has reviewed.

herd's entry points and callbacks log through the standard ``logging`` module under the ``herd``
logger. Hydra's job logging (``configs/hydra/default.yaml``) sends those records to the console
and to ``<run folder>/train.log``, so the resume choice, skipped shards, schedule changes, gates,
progress lines and the final summary are kept with the run.

:func:`filter_reviewed_warnings` silences the warnings that Lightning and torch print on every
run and that herd has checked do not apply to it; the list lives here, in one place.
"""

from __future__ import annotations

import logging
import warnings

from lightning.pytorch.utilities import rank_zero_only

# (message regex, why herd can ignore it)
REVIEWED_WARNINGS = (
    (r".*`isinstance\(treespec, LeafSpec\)` is deprecated",
     "Lightning's own use of a torch API; nothing a herd user can change"),
    (r".*Your `IterableDataset` has `__len__` defined",
     "herd's streams split shards by rank and worker themselves; __len__ only sizes validation"),
    (r".*Precision bf16-mixed is not supported by the model summary",
     "the summary's size estimate uses 32 bits; the parameter counts are exact"),
    (r".*The number of training batches \(\d+\) is smaller than the logging interval",
     "herd's context and batch schedules cut the stream into short epochs on purpose"),
    (r".*Checkpoint directory .* exists and is not empty",
     "herd writes last.ckpt in place on purpose (requeue and resume into the same run folder)"),
    (r".*Experiment logs directory .* exists and is not empty",
     "herd's CSV logger continues metrics.csv itself when a run resumes in its own folder"),
)


def filter_reviewed_warnings() -> None:
    """Ignore the warnings listed in :data:`REVIEWED_WARNINGS` (idempotent)."""
    for pattern, _why in REVIEWED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    # Lightning's advertisement for a cloud logger, printed once per run
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoTips())


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


FILE_ONLY = "herd_file_only"


class ConsoleFilter(logging.Filter):
    """Drops records logged with ``extra={FILE_ONLY: True}`` (printed to the console another way)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, FILE_ONLY, False)


def get_logger(name: str) -> logging.Logger:
    """A logger under ``herd`` (pass ``__name__``)."""
    return logging.getLogger(name if name.startswith("herd") else f"herd.{name}")


def info(logger: logging.Logger, message: str) -> None:
    """Log ``message`` once per job: on the global rank 0 only. Printed when logging is not set up
    (herd called from Python rather than from its Hydra entry points)."""
    if rank_zero_only.rank != 0:
        return
    if logger.hasHandlers():
        logger.info(message)
    else:
        print(message, flush=True)


def warning(logger: logging.Logger, message: str) -> None:
    """Log a warning on the global rank 0 only."""
    if rank_zero_only.rank == 0:
        logger.warning(message)
