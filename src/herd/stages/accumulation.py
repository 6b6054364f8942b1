"""Exact gradient accumulation: an optimizer step's update is that of its whole window as one batch.

With ``trainer.accumulate_grad_batches = k`` on ``W`` data-parallel ranks, one optimizer step sums
the gradients of k micro-batches per rank; Lightning divides each micro-batch's loss by k and the
data-parallel all-reduce averages over the W ranks. A loss that is a mean over one micro-batch's
own tokens (or pairs, or prompts) would weigh every micro-batch alike, whatever its count: 3
target tokens as much as 300. So herd's stages write each loss as sums over a micro-batch divided
by counts of the WHOLE window on every rank:

    loss_j = k * W * sum_terms (sum of term t over micro-batch j) / (count of term t over the
                                k micro-batches of all W ranks)

The factor k * W undoes Lightning's division and the all-reduce's mean, so the update is
``grad sum_terms (sum over the window) / (count over the window)``: the loss of the k x W
micro-batches as one batch. A stage names its terms and how to count them from a batch alone,
without the model (:meth:`~herd.stages.base.BackboneStage.loss_counts`).

The counts are known before the forward pass: :func:`install` wraps the DataModule's train
dataloader in :class:`WindowTotals`, which reads a window's micro-batches ahead (the same batches,
in the same order), adds up their counts and tags each micro-batch with its window's totals on
this rank (``batch[WINDOW_KEY]``). The training step sums those over the ranks (one small
all-reduce, :meth:`~herd.stages.base.BackboneStage.window_totals`). Windows start at each epoch's
first batch and end where Lightning steps: every k batches, and at the epoch's last batch
(``trainer.num_training_batches``, which ``limit_train_batches`` and the batch ramp set).

A batch without the tag (validation, a dataloader given to ``fit`` directly) is normalised by its
own counts: the mean over that micro-batch, as without accumulation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import lightning as L
import torch

WINDOW_KEY = "loss_window"  # batch key: {term: this rank's total over the micro-batch's window}
Counts = dict[str, torch.Tensor]


class WindowTotals:
    """A train dataloader whose batches carry their accumulation window's totals (see the module docstring).

    ``counts(batch)`` gives one micro-batch's counts ({term: int64 scalar}). Everything else (``len``,
    ``dataset``, ``worker_init_fn``, ...) is the wrapped loader's, so Lightning treats it as that loader.
    """

    def __init__(self, loader: Any, trainer: L.Trainer, counts: Callable[[dict[str, Any]], Counts]) -> None:
        object.__setattr__(self, "loader", loader)
        object.__setattr__(self, "trainer", trainer)
        object.__setattr__(self, "counts", counts)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = iter(self.loader)
        limit = self.trainer.num_training_batches  # inf for an endless stream
        used = 0
        while True:
            k = int(self.trainer.accumulate_grad_batches)
            left = limit - used
            window = list(islice(batches, k if left <= 0 or math.isinf(left) else min(k, int(left))))
            if not window:
                return
            per_batch = [self.counts(batch) for batch in window]
            totals = {term: sum(counts[term] for counts in per_batch).to(torch.long) for term in per_batch[0]}
            for batch in window:
                batch[WINDOW_KEY] = {term: total.clone() for term, total in totals.items()}
            used += len(window)
            yield from window

    def __len__(self) -> int:
        return len(self.loader)  # a TypeError for an unsized loader, as Lightning expects

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.loader, name, value)  # e.g. Lightning's worker_init_fn reaches the real loader


def install(trainer: L.Trainer, counts: Callable[[dict[str, Any]], Counts]) -> bool:
    """Wrap ``trainer.datamodule``'s train dataloader in :class:`WindowTotals` (once; a later call
    replaces the counting function). Returns False when there is no DataModule to wrap."""
    datamodule = trainer.datamodule
    if datamodule is None:
        return False
    current = datamodule.train_dataloader
    original = getattr(current, "herd_unwindowed", current)

    @functools.wraps(original)  # Lightning checks that train_dataloader is overridden through __wrapped__
    def train_dataloader():
        return WindowTotals(original(), trainer, counts)

    train_dataloader.herd_unwindowed = original
    datamodule.train_dataloader = train_dataloader
    return True
