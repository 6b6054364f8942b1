"""The next-token losses that the stages, the callbacks and the evaluation share.

Batches are dicts of (batch, seq) tensors: ``tokens``, ``document_ids`` and ``targets`` (the next
token, or :data:`~herd.constants.IGNORE_INDEX` where nothing is scored). With a ``chunk_size``
the output head and the loss run that many positions at a time, so the (positions, vocab) logits
of a long sequence never exist at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from herd.constants import IGNORE_INDEX
from herd.model.transformer import Transformer


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
