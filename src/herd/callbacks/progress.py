"""Training progress in optimizer steps: a rich bar on a terminal, plain lines everywhere else.

herd's streams have no epochs, so both count optimizer steps up to the run's length
(``trainer.max_steps``, or a schedule's planned steps when shorter). Under sbatch, ``| tee`` or
nohup, where a bar would print nothing useful, :class:`LineProgress` writes one line every
``every_n_steps`` steps or ``every_seconds`` seconds, whichever comes first::

    step 150/300 (50%) | loss 5.912 | lr 2.43e-03 | 5,210 tok/s | elapsed 2:31 | ETA 2:29

and one line per validation. The lines go through the ``herd`` logger, so they are also in the
run's ``train.log``.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

from herd import logs
from herd.data.loaders.ranks import data_parallel_size

logger = logs.get_logger(__name__)


def step_progress(leave: bool = True, every_n_steps: int = 50, every_seconds: float = 60.0,
                  force: str | None = None) -> ProgressBar:
    """The progress display for this process: :class:`StepProgressBar` when stdout is a terminal,
    else :class:`LineProgress`. ``force`` (``rich`` or ``lines``) overrides the choice."""
    if force not in (None, "rich", "lines"):
        raise ValueError(f"callbacks.progress_bar.force={force!r}: use rich, lines or null (by terminal)")
    if force == "rich" or (force is None and sys.stdout.isatty()):
        return StepProgressBar(leave=leave)
    return LineProgress(every_n_steps=every_n_steps, every_seconds=every_seconds)


def run_length(trainer: L.Trainer) -> int | None:
    """Optimizer steps of the whole run: ``max_steps``, or a schedule's planned steps when shorter."""
    limits = [c.planned_steps(trainer) for c in trainer.callbacks if hasattr(c, "planned_steps")]
    if trainer.max_steps is not None and trainer.max_steps > 0:
        limits.append(trainer.max_steps)
    return min(limits) if limits else None


class StepProgressBar(RichProgressBar):
    """RichProgressBar over optimizer steps (``step 320/1000``, also after a resume)."""

    @property
    def total_train_batches(self) -> int | float:
        """The run's length in steps, not the (endless) stream's batches."""
        total = run_length(self.trainer)
        return total if total is not None else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return "steps"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Show the global step, which continues across resumes and schedule stages."""
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._update(self.train_progress_bar_id, trainer.global_step)
        self.refresh()


class LineProgress(ProgressBar):
    """One plain line every ``every_n_steps`` steps or ``every_seconds`` seconds (see module docstring)."""

    def __init__(self, every_n_steps: int = 50, every_seconds: float = 60.0) -> None:
        super().__init__()
        if every_n_steps < 1 or every_seconds <= 0:
            raise ValueError("callbacks.progress_bar: every_n_steps must be >= 1 and every_seconds > 0")
        self.every_n_steps = every_n_steps
        self.every_seconds = every_seconds
        self._enabled = True
        self._reset_clock()

    def _reset_clock(self) -> None:
        self._start_time = self._last_time = time.perf_counter()
        self._start_step = self._last_step = None
        self._tokens_since_last = 0

    # ProgressBar's interface
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def is_disabled(self) -> bool:
        return not self._enabled

    def on_train_start(self, trainer, pl_module) -> None:
        self._reset_clock()
        self._start_step = self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(batch, dict) and "tokens" in batch:
            self._tokens_since_last += batch["tokens"].numel() * data_parallel_size(trainer)
        step, now, total = trainer.global_step, time.perf_counter(), run_length(trainer)
        due = (step - self._last_step >= self.every_n_steps or now - self._last_time >= self.every_seconds
               or step == total)
        if not due or step == self._last_step:
            return
        line = self.line(trainer, step, total, now)
        self._last_step, self._last_time, self._tokens_since_last = step, now, 0
        if self.is_enabled and trainer.is_global_zero:
            logs.info(logger, line)

    def line(self, trainer: L.Trainer, step: int, total: int | None, now: float) -> str:
        """The progress line at ``step`` (see the module docstring)."""
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"]
        metrics = trainer.callback_metrics
        if "train/loss" in metrics:
            parts.append(f"loss {float(metrics['train/loss']):.3f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        seconds = max(now - self._last_time, 1e-9)
        if self._tokens_since_last:
            parts.append(f"{self._tokens_since_last / seconds:,.0f} tok/s")
        elapsed = now - self._start_time
        parts.append(f"elapsed {logs.clock(elapsed)}")
        done = step - (self._start_step or 0)
        if total and done > 0:
            parts.append(f"ETA {logs.clock(elapsed / done * (total - step))}")
        return " | ".join(parts)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.is_disabled:
            return
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
        if values:
            shown = " | ".join(f"{k} {v:.4f}" for k, v in sorted(values.items()))
            logs.info(logger, f"validation at step {trainer.global_step}: {shown}")

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        return {}
