"""Helpers for tests that fit a built run with extra callbacks and look at what each step did."""

from __future__ import annotations

import lightning as L

from herd.train import build


class Recorder(L.Callback):
    """Remembers each training batch's shape, the LR, and the weights after every optimizer step."""

    def __init__(self):
        self.shapes, self.lrs, self.weights = [], [], {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.shapes.append(tuple(batch["tokens"].shape))
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.weights[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}


def fit(cfg, *extra_callbacks):
    objects = build(cfg)
    trainer = objects["trainer"]
    trainer.callbacks.extend(extra_callbacks)
    trainer.fit(objects["stage"], datamodule=objects["datamodule"])
    return objects
