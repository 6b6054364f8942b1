"""Pretraining: next-token cross-entropy on packed sequences with document masks.

Batches are dicts of (batch, seq) tensors: ``tokens``, ``document_ids`` and ``targets`` (the next
token, or -100 where the next token belongs to another document). The same stage serves
long-context continued pretraining.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from herd.model import Transformer
from herd.stages.base import BackboneStage

IGNORE_INDEX = -100


def next_token_loss(model: Transformer, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the predicted tokens, and how many tokens it averaged."""
    logits = model(batch["tokens"], document_ids=batch.get("document_ids"))  # (batch, seq, vocab)
    targets = batch["targets"]
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
    return loss, (targets != IGNORE_INDEX).sum()


class PretrainStage(BackboneStage):
    """Next-token prediction; logs train/loss, val/loss and val/perplexity."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.val_loss = MeanMetric()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = next_token_loss(self.model, batch)
        self.count_tokens(batch["tokens"])
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/tokens_seen", float(self.tokens_seen), on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, n_tokens = next_token_loss(self.model, batch)
        self.val_loss.update(loss, weight=n_tokens)  # token-weighted over the whole split

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/perplexity", torch.exp(loss), sync_dist=False)
