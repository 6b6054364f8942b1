"""A rich progress bar that counts optimizer steps (herd's streams have no epochs)."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """RichProgressBar labelled with the step range instead of "Epoch 0/-2"."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            return f"steps {trainer.global_step}..{trainer.max_steps}"
        return super()._get_train_description(current_epoch)
