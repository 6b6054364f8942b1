"""herd's own messages, and the Lightning warnings herd has reviewed.

herd's entry points and callbacks log through the standard ``logging`` module under the ``herd``
logger. Hydra's job logging (``configs/hydra/default.yaml``) sends those records to the console
and to ``<run folder>/train.log``, so the resume choice, skipped shards, schedule changes, gates,
progress lines and the final summary are kept with the run.

:func:`filter_reviewed_warnings` silences the warnings that Lightning and torch print on every
run and that herd has checked do not apply to it; the list lives here, in one place.

:class:`Progress` shows how far a long job (an evaluation task, rejection sampling) has come, as
plain lines or a rich bar; :func:`clock` writes its durations (and those of the training lines).
"""

from __future__ import annotations

import logging
import math
import sys
import time
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


def clock(seconds: float) -> str:
    """A duration as ``m:ss`` or ``h:mm:ss`` (``?`` when it is not finite)."""
    if not math.isfinite(seconds):
        return "?"
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    """Progress of a long job in plain lines, at most one every ``every_seconds``, and a last one
    from :meth:`close`::

        mcq: 1,200/3,600 choices (33%) | elapsed 0:12 | ETA 0:24
        sampling: 64/256 prompts (25%) | 2,410 tok/s | elapsed 1:02 | ETA 3:06

    The lines go through ``logger`` (the ``herd`` logger by default; see :func:`info`: console and
    the run's log file, global rank 0 only). ``bar=True`` shows a rich progress bar instead when
    stdout is a terminal; ``enabled=False`` only counts. :meth:`update` counts work done (and
    tokens generated, for the rate); :meth:`close` returns the seconds since the start.
    """

    def __init__(self, task: str, total: int, unit: str, every_seconds: float = 10.0, *, enabled: bool = True,
                 bar: bool = False, logger: logging.Logger | None = None) -> None:
        self.task, self.total, self.unit, self.every_seconds = task, max(0, int(total)), unit, every_seconds
        self.enabled, self.logger = enabled, logger or get_logger(__name__)
        self.done = self.tokens = 0
        self.start = self.last = time.perf_counter()
        self.bar = None
        if enabled and bar and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                    TimeRemainingColumn())
            self.bar_task = self.bar.add_task(task, total=self.total)
            self.bar.start()

    def update(self, amount: int = 1, tokens: int = 0) -> None:
        """Count ``amount`` more units (and ``tokens`` more tokens); a line if ``every_seconds`` have passed."""
        self.done, self.tokens = self.done + amount, self.tokens + tokens
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.bar_task, advance=amount)
            return
        now = time.perf_counter()
        if now - self.last >= self.every_seconds:
            self.last = now
            info(self.logger, self.line(now))

    def close(self) -> float:
        """Stop the bar, or print the final line (how long it took); the seconds since the start."""
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.stop()
        elif self.enabled:
            info(self.logger, self.line(now, final=True))
        return now - self.start

    def line(self, now: float, final: bool = False) -> str:
        """The progress line at time ``now`` (``time.perf_counter``)."""
        elapsed = now - self.start
        share = self.done / self.total if self.total else 1.0
        parts = [f"{self.task}: {self.done:,}/{self.total:,} {self.unit} ({share:.0%})"]
        if self.tokens:
            parts.append(f"{self.tokens / max(elapsed, 1e-9):,.0f} tok/s")
        parts.append(f"elapsed {clock(elapsed)}")
        if not final and 0 < share < 1:
            parts.append(f"ETA {clock(elapsed / share - elapsed)}")
        return " | ".join(parts)
