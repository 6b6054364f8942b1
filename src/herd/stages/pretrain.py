"""Pretraining: next-token cross-entropy on packed sequences with document masks.

Batches are dicts of (batch, seq) tensors: ``tokens``, ``document_ids`` and ``targets`` (the next
token, or -100 where the next token belongs to another document). The same stage serves
long-context continued pretraining. The losses are :mod:`herd.model.loss`'s, shared with the
long-context schedule and ``herd.evaluate``: the output layer runs on the predicted positions only,
one chunk at a time, and never builds (batch, seq, vocab) logits.
"""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric

from herd.model.context import ContextParallel
from herd.model.loss import next_token_loss, next_token_scores
from herd.stages.base import BackboneStage


def row_mean(loss: torch.Tensor, n_tokens: torch.Tensor, context: ContextParallel | None) -> torch.Tensor:
    """The mean over the whole rows of a micro-batch from this rank's mean over its places (context
    parallelism: summed over the group, detached: for logging); ``loss`` itself without context parallelism."""
    if context is None:
        return loss
    sums = torch.stack([loss.detach() * n_tokens, n_tokens.to(loss.dtype)])
    torch.distributed.all_reduce(sums, group=context.group)
    return sums[0] / sums[1].clamp(min=1)


class PretrainStage(BackboneStage):
    """Next-token prediction; logs train/loss, and val/loss, val/perplexity and val/accuracy (greedy
    next-token accuracy), all token-weighted over the predicted tokens of the val split.

    The training loss is token-weighted over the whole accumulation window on every rank (see
    :mod:`herd.stages.accumulation`). The output layer runs on the predicted positions only,
    ``loss_chunk_size`` of them at a time (null: as many as keep a chunk's float32 logits near
    128 MiB, see :mod:`herd.model.loss`).

    It runs under context parallelism (``strategy=fsdp2_cp``): each rank computes its places of
    every row, its loss divides their sum by the window's count over all ranks, and the logged
    losses are those of the whole rows.
    """

    supports_context_parallel = True

    def __init__(self, *args, loss_chunk_size: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if loss_chunk_size is not None and loss_chunk_size <= 0:
            raise ValueError(f"stage.loss_chunk_size must be a positive number of positions, got {loss_chunk_size}")
        self.loss_chunk_size = loss_chunk_size
        self.val_loss = MeanMetric()
        self.val_accuracy = MeanMetric()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The mean cross-entropy over every predicted token of the accumulation window (all ranks)."""
        context = self.context
        loss, n_tokens = next_token_loss(self.model, batch, self.loss_chunk_size, context=context)
        self.count_tokens(batch["tokens"])
        self.log("train/loss", row_mean(loss, n_tokens, context), on_step=True, on_epoch=False, prog_bar=True,
                 sync_dist=self.trainer.world_size > 1)
        self.log("train/tokens_seen", float(self.tokens_seen), on_step=True, on_epoch=False)
        return self.window_loss({"tokens": loss * n_tokens}, batch)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        total, n_tokens, correct = next_token_scores(self.model, batch, self.loss_chunk_size, context=self.context)
        if n_tokens > 0:  # token-weighted over the whole split
            self.val_loss.update(total / n_tokens, weight=n_tokens)
            self.val_accuracy.update(correct / n_tokens, weight=n_tokens)

    def on_validation_epoch_end(self) -> None:
        loss, accuracy = self.val_loss.compute(), self.val_accuracy.compute()
        self.val_loss.reset()
        self.val_accuracy.reset()
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/perplexity", torch.exp(loss), sync_dist=False)
        self.log("val/accuracy", accuracy, sync_dist=False)


class LongContextStage(PretrainStage):
    """Long-context continued pretraining (stage=long_context): :class:`PretrainStage` continuing a model
    directory, with the context schedule (``callbacks.context_schedule``) lengthening its sequences."""

    continues_model = True
    stage_name = "long_context"
    starts_from = "the model to extend, e.g. the export of a pretraining run (logs/pretrain/runs/<run>/export)"


class AnnealStage(PretrainStage):
    """Annealing a partly trained model (``experiment=anneal_valuation``): :class:`PretrainStage`
    continuing a model directory, its LR falling to 0 over ``anneal_tokens``."""

    continues_model = True
    stage_name = "anneal"
    starts_from = "the partly trained model to anneal, e.g. the export of a pretraining run (logs/pretrain/runs/<run>/export)"
