"""Pretraining: next-token cross-entropy on packed sequences with document masks.

Batches are dicts of (batch, seq) tensors: ``tokens``, ``document_ids`` and ``targets`` (the next
token, or -100 where the next token belongs to another document). The same stage serves
long-context continued pretraining.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torchmetrics import MeanMetric

from herd.model import Transformer
from herd.stages.base import BackboneStage

IGNORE_INDEX = -100


def next_token_loss(
    model: Transformer, batch: dict[str, torch.Tensor], chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the predicted tokens, and how many tokens it averaged.

    With ``chunk_size`` the output head and the loss run ``chunk_size`` positions at a time and
    are recomputed in the backward pass, so (batch, seq, vocab) logits never exist at once.
    """
    targets = batch["targets"]
    n_tokens = (targets != IGNORE_INDEX).sum()
    if chunk_size is None:
        logits = model(batch["tokens"], document_ids=batch.get("document_ids"))  # (batch, seq, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        return loss, n_tokens
    hidden = model.hidden_states(batch["tokens"], document_ids=batch.get("document_ids"))  # (batch, seq, dim)
    return chunked_cross_entropy(hidden, model.output.weight, targets, chunk_size) / n_tokens.clamp(min=1), n_tokens


@torch.no_grad()
def next_token_scores(
    model: Transformer, batch: dict[str, torch.Tensor], chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For evaluation: the summed cross-entropy, the number of predicted tokens, and how many of them
    the model ranks first (greedy next-token accuracy). One forward pass; with ``chunk_size`` the
    (seq x vocab) logits exist one chunk at a time."""
    targets = batch["targets"].flatten()
    if chunk_size is None:
        logits = model(batch["tokens"], document_ids=batch.get("document_ids")).flatten(0, 1).float()
        chunks = [(logits, targets)]
    else:
        hidden = model.hidden_states(batch["tokens"], document_ids=batch.get("document_ids")).flatten(0, 1)
        chunks = ((F.linear(hidden[i : i + chunk_size], model.output.weight).float(), targets[i : i + chunk_size])
                  for i in range(0, hidden.shape[0], chunk_size))
    total, correct = torch.zeros((), dtype=torch.float32), torch.zeros((), dtype=torch.long)
    for logits, chunk_targets in chunks:
        total = total + F.cross_entropy(logits, chunk_targets, ignore_index=IGNORE_INDEX, reduction="sum").cpu()
        predicted = chunk_targets != IGNORE_INDEX
        correct = correct + (logits.argmax(dim=-1)[predicted] == chunk_targets[predicted]).sum().cpu()
    return total, (targets != IGNORE_INDEX).sum(), correct


def chunked_cross_entropy(
    hidden: torch.Tensor, output_weight: torch.Tensor, targets: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ output_weight.T`` against ``targets``, ``chunk_size`` rows at a time.

    Each chunk's logits are freed after its loss and recomputed during backward (activation
    checkpointing), so peak memory holds one chunk of logits instead of the whole sequence.
    """
    hidden, targets = hidden.flatten(0, 1), targets.flatten()  # (tokens, dim), (tokens,)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        total = total + checkpoint(
            _chunk_loss, hidden[start : start + chunk_size], output_weight, targets[start : start + chunk_size],
            use_reentrant=False,
        )
    return total


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()  # (chunk, vocab)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


class PretrainStage(BackboneStage):
    """Next-token prediction; logs train/loss, and val/loss, val/perplexity and val/accuracy (greedy
    next-token accuracy), all token-weighted over the predicted tokens of the val split.

    ``loss_chunk_size`` (positions per chunk) turns on the chunked cross-entropy for long contexts.
    """

    def __init__(self, *args, loss_chunk_size: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if loss_chunk_size is not None and loss_chunk_size <= 0:
            raise ValueError(f"stage.loss_chunk_size must be a positive number of positions, got {loss_chunk_size}")
        self.loss_chunk_size = loss_chunk_size
        self.val_loss = MeanMetric()
        self.val_accuracy = MeanMetric()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = next_token_loss(self.model, batch, self.loss_chunk_size)
        self.count_tokens(batch["tokens"])
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, sync_dist=self.trainer.world_size > 1)
        self.log("train/tokens_seen", float(self.tokens_seen), on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        total, n_tokens, correct = next_token_scores(self.model, batch, self.loss_chunk_size)
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
