"""Polyak averaging of the checkpoints taken during annealing (Llama 3's final model)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from herd import logs

logger = logs.get_logger(__name__)


class CheckpointAveraging(L.Callback):
    """Keeps the running mean of the weights every ``every_n_steps`` steps from ``start_step`` on.

    ``start_step`` defaults to the start of the LR schedule's annealing phase. At the end of
    training the model's weights are replaced by the average, so the exported model is the
    averaged one. The average is stored in checkpoints, so a resumed run keeps averaging.
    """

    def __init__(self, every_n_steps: int = 1, start_step: int | None = None) -> None:
        if every_n_steps <= 0:
            raise ValueError("callbacks.averaging.every_n_steps must be > 0")
        self.every_n_steps = every_n_steps
        self.start_step = start_step
        self.count = 0
        self.average: dict[str, torch.Tensor] = {}

    def window_start(self, pl_module: L.LightningModule) -> int | None:
        """First step that enters the average (None: no annealing phase configured)."""
        if self.start_step is not None:
            return self.start_step
        schedule = getattr(pl_module, "lr_schedule", None)
        return schedule.anneal_start if schedule is not None else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        start, step = self.window_start(pl_module), trainer.global_step
        if start is None or step < start or (step - start) % self.every_n_steps:
            return
        self.count += 1
        with torch.no_grad():
            for name, param in pl_module.model.named_parameters():
                value = param.detach().float()
                if name not in self.average:
                    self.average[name] = value.clone()
                else:
                    self.average[name].add_(value - self.average[name], alpha=1.0 / self.count)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.count:
            logs.info(logger, "checkpoint averaging: no step reached the averaging window; weights unchanged")
            return
        with torch.no_grad():
            for name, param in pl_module.model.named_parameters():
                param.copy_(self.average[name].to(param.dtype))
        logs.info(logger, f"checkpoint averaging: the model is now the mean of {self.count} checkpoints")

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "average": self.average}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.count = int(state_dict["count"])
        self.average = dict(state_dict["average"])
