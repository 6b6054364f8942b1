"""Validation at the run's last step, so that every run ends measured.

Lightning validates every ``trainer.val_check_interval`` steps; a run whose ``trainer.max_steps`` is
not a multiple of it (a short run below the interval, a run of 130 steps validated every 50) would
end without a validation after its last steps, and its summary would have no before/after.
:class:`ValidateLastStep` asks Lightning to stop at ``max_steps`` (``trainer.should_stop``), which
makes its training loop validate that step; when the last step is a multiple of the interval it is
the same single validation, so no step is validated twice.
"""

from __future__ import annotations

import lightning as L


class ValidateLastStep(L.Callback):
    """Validate at ``trainer.max_steps`` whether or not it falls on ``val_check_interval``."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        last = trainer.max_steps
        if last is not None and last > 0 and trainer.global_step >= last and not trainer.fast_dev_run:
            trainer.should_stop = True  # Lightning validates a run that is stopping, then ends it
