"""herd's loggers: Lightning's TensorBoard and CSV loggers that continue a run in place.

A run resumed in its own folder (a SLURM requeue, a torchrun restart with the same rendezvous id,
``HERD_RUN_ID``) appends to the logs it already has. Everything logged after the checkpoint it
resumes from is dropped first, because the resumed run logs those steps again:

- TensorBoard: the writer starts with ``purge_step`` = the checkpoint's step, so TensorBoard hides
  the earlier events from that step on;
- CSV: rows of ``metrics.csv`` from that step on are removed, the rest is kept and appended to.

The TensorBoard logger also fills the HPARAMS tab (:meth:`TensorBoardLogger.log_run_summary`: the
flattened config with the run's final metrics, the val metrics first) and leaves out Lightning's constant ``epoch``
scalar, since herd's streams have no epochs.
"""

from __future__ import annotations

import csv
import os
from typing import Any

from lightning.fabric.utilities.logger import _flatten_dict
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import TensorBoardLogger as _LightningTensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only


class TensorBoardLogger(_LightningTensorBoardLogger):
    """Lightning's TensorBoardLogger without the ``epoch`` scalar, resumable in place, with HPARAMS."""

    def resume_at(self, step: int) -> None:
        """Continue the run's event files; events from ``step`` on are hidden (they are logged again)."""
        if self._experiment is not None:
            raise RuntimeError("resume_at must be called before the logger writes anything")
        self._kwargs["purge_step"] = int(step)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log scalars, without the epoch counter Lightning adds (herd's streams have no epochs)."""
        metrics = {k: v for k, v in metrics.items() if k != "epoch"}
        if metrics:
            super().log_metrics(metrics, step)

    @rank_zero_only
    def log_run_summary(self, params: dict[str, Any], metrics: dict[str, float]) -> None:
        """Write the HPARAMS entry of this run: ``params`` (flattened) and the names of ``metrics``.

        TensorBoard shows each metric's latest scalar of the same tag, so the end metrics of the run
        (``val/loss``, ...) appear next to its config without being logged a second time. Its table
        shows the first 5 metrics until others are ticked: the val metrics come first (:func:`metric_order`).
        """
        from torch.utils.tensorboard.summary import hparams

        flat = self._sanitize_params(_flatten_dict(params, delimiter="."))  # keys as Hydra overrides name them
        flat = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in flat.items()}
        ordered = {k: float(metrics[k]) for k in metric_order(metrics)}
        experiment, start, end = hparams(flat, ordered)
        writer = self.experiment._get_file_writer()
        for summary in (experiment, start, end):
            writer.add_summary(summary)
        writer.flush()


def metric_order(names) -> list[str]:
    """HPARAMS' column order: ``val/loss``, the other ``val/*`` metrics, then the rest (``train/loss``...),
    each group in its given order."""
    names = list(names)
    return sorted(names, key=lambda k: (k != "val/loss", not k.startswith("val/")))


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer that keeps ``metrics.csv`` rows before ``keep_before`` and appends."""

    def __init__(self, log_dir: str, keep_before: int) -> None:
        self.keep_before = keep_before
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            fields = list(reader.fieldnames or [])
            rows = [row for row in reader if row.get("step") and int(float(row["step"])) < self.keep_before]
        temporary = f"{self.metrics_file_path}.tmp-{os.getpid()}"
        with self._fs.open(temporary, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(temporary, self.metrics_file_path)
        self.metrics_keys = sorted(fields)


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSVLogger that can continue a run's ``metrics.csv`` (see :meth:`resume_at`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._keep_before: int | None = None

    def resume_at(self, step: int) -> None:
        """Keep the rows logged before ``step`` and append after them (later ones are logged again)."""
        if self._experiment is not None:
            raise RuntimeError("resume_at must be called before the logger writes anything")
        self._keep_before = int(step)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        """The CSV writer; after :meth:`resume_at`, one that continues the existing file."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = (ExperimentWriter(self.log_dir) if self._keep_before is None
                                else _AppendingWriter(self.log_dir, self._keep_before))
        return self._experiment
