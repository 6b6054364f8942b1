"""Batch-size / sequence-length ramp by tokens seen (Llama 3: 4M tokens @ 4K, 8M @ 8K, then 16M)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


@dataclass(frozen=True)
class RampStage:
    """From ``after_tokens`` tokens seen on, read ``batch_size`` rows (per device) of ``seq_len`` tokens."""

    after_tokens: int
    batch_size: int
    seq_len: int


class BatchRamp(L.Callback):
    """Changes the DataModule's batch size and sequence length as training passes token thresholds.

    Each ramp stage runs as its own epoch: the callback bounds the epoch to the batches that
    reach the next threshold and Lightning re-creates the train dataloader between epochs
    (the callback switches ``reload_dataloaders_every_n_epochs`` on). The DataModule must offer
    ``set_batch_size`` and ``set_seq_len``.
    """

    def __init__(self, stages: Sequence[dict[str, int] | RampStage]) -> None:
        parsed = [s if isinstance(s, RampStage) else RampStage(**s) for s in stages]
        self.stages = sorted(parsed, key=lambda s: s.after_tokens)
        if not self.stages or self.stages[0].after_tokens != 0:
            raise ValueError("callbacks.batch_ramp.stages must start with a stage at after_tokens: 0")
        if any(s.batch_size <= 0 or s.seq_len <= 0 for s in self.stages):
            raise ValueError("callbacks.batch_ramp.stages need positive batch_size and seq_len")

    def stage_at(self, tokens_seen: int) -> int:
        """Index of the ramp stage in force after ``tokens_seen`` tokens."""
        return max(i for i, s in enumerate(self.stages) if s.after_tokens <= tokens_seen)

    def final_tokens_per_step(self, trainer: L.Trainer) -> int:
        """Global batch in tokens of the last ramp stage (used to express annealing in tokens)."""
        last = self.stages[-1]
        return last.batch_size * last.seq_len * trainer.world_size

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.reload_dataloaders_every_n_epochs = 1
        self._apply(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(trainer, pl_module)

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tokens_seen = pl_module.tokens_seen
        index = self.stage_at(tokens_seen)
        stage = self.stages[index]
        datamodule = trainer.datamodule
        datamodule.set_batch_size(stage.batch_size)
        datamodule.set_seq_len(stage.seq_len)
        if index + 1 < len(self.stages):
            per_step = stage.batch_size * stage.seq_len * trainer.world_size
            remaining = self.stages[index + 1].after_tokens - tokens_seen
            trainer.limit_train_batches = max(1, math.ceil(remaining / per_step))
        else:
            trainer.limit_train_batches = 1.0
        rank_zero_info(f"batch ramp: stage {index} from {tokens_seen:,} tokens: batch {stage.batch_size} x "
                       f"seq {stage.seq_len} per device")
