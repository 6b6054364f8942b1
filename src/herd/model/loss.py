"""The next-token losses and log-probabilities that the stages, the callbacks and the evaluation share.

Batches are dicts of (batch, seq) tensors: ``tokens``, ``document_ids`` and ``targets`` (the next
token, or :data:`~herd.constants.IGNORE_INDEX` where nothing is scored).

Two rules hold for every caller:

- **Scored positions only.** The output layer runs on the hidden states of the positions that
  predict a target (``targets != IGNORE_INDEX``), gathered first: prompts, headers and padding
  cost no head FLOPs and no logit memory.
- **Never whole logits.** :func:`target_logps` (the one implementation) computes the
  log-probability of each target ``chunk`` rows at a time: the chunk's logits, their logsumexp and
  the target's logit in float32, then the chunk is freed. Its backward recomputes each chunk's
  logits instead of keeping them, so training holds one chunk of (rows, vocab) logits at a time.

Without a ``chunk_size`` a chunk holds as many rows as keep its float32 logits near
:data:`LOGIT_BUDGET` elements (128 MiB): 4,096 rows at a vocabulary of 8,192, 261 at Llama 3's
128,256.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from herd.constants import IGNORE_INDEX
from herd.model.context import ContextParallel, local
from herd.model.transformer import Transformer

LOGIT_BUDGET = 1 << 25  # float32 logits in one chunk when no chunk_size is given (128 MiB)


def chunk_rows(vocab_size: int, chunk_size: int | None = None) -> int:
    """Rows per chunk: ``chunk_size``, or as many as keep a chunk's logits near :data:`LOGIT_BUDGET`."""
    if chunk_size is not None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")
        return int(chunk_size)
    return max(1, LOGIT_BUDGET // vocab_size)


def target_logps(
    hidden: torch.Tensor, output_weight: torch.Tensor, targets: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """log p(target) of each row: ``log_softmax(hidden @ output_weight.T)[i, targets[i]]``, float32.

    ``hidden`` (rows, dim) are final normed hidden states at scored positions only; ``targets``
    (rows,) hold no IGNORE_INDEX. The logits exist one chunk of rows at a time, in the forward and
    in the backward (which recomputes them). Under autocast the matmul runs in the autocast dtype,
    as ``F.linear`` would; logsumexp and the target's logit are float32 either way.
    """
    if hidden.ndim != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"target_logps takes hidden (rows, dim) and targets (rows,), got {tuple(hidden.shape)} "
                         f"and {tuple(targets.shape)}")
    rows = chunk_rows(output_weight.shape[0], chunk_size)
    return _TargetLogps.apply(hidden, output_weight, targets, rows, _compute_dtype(hidden, output_weight))


def scored(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hidden states (scored, dim) at the positions that predict a target, those targets (scored,),
    and the (batch, seq) mask of those positions."""
    mask = targets != IGNORE_INDEX
    return hidden[mask], targets[mask], mask


def next_token_loss(
    model: Transformer, batch: dict[str, torch.Tensor], chunk_size: int | None = None,
    context: ContextParallel | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the predicted tokens, and how many tokens it averaged.

    The head runs on the predicted positions only, ``chunk_size`` of them at a time (see the
    module docstring); the (batch, seq, vocab) logits never exist. Under ``context`` parallelism
    the batch holds whole rows and the mean and count are those of this rank's places.
    """
    hidden = model.hidden_states(batch["tokens"], document_ids=batch.get("document_ids"), context=context)
    rows, targets, _ = scored(hidden, local(batch["targets"], context))
    n_tokens = targets.new_tensor(targets.numel())
    total = -target_logps(rows, model.output.weight, targets, chunk_size).sum()
    return total / n_tokens.clamp(min=1), n_tokens


@torch.no_grad()
def next_token_scores(
    model: Transformer, batch: dict[str, torch.Tensor], chunk_size: int | None = None,
    context: ContextParallel | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For evaluation: the summed cross-entropy, the number of predicted tokens, and how many of them
    the model ranks first (greedy next-token accuracy). One forward pass; the head runs on the
    predicted positions only, one chunk at a time. Under ``context`` parallelism: of this rank's places."""
    hidden = model.hidden_states(batch["tokens"], document_ids=batch.get("document_ids"), context=context)
    rows, targets, _ = scored(hidden, local(batch["targets"], context))
    return target_scores(rows, model.output.weight, targets, chunk_size)


@torch.no_grad()
def target_scores(
    hidden: torch.Tensor, output_weight: torch.Tensor, targets: torch.Tensor, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed cross-entropy (float32, on the CPU), number of targets and greedy hits of ``hidden``
    (rows, dim) against ``targets`` (rows,), one chunk of logits at a time."""
    dtype = _compute_dtype(hidden, output_weight)
    total, correct = torch.zeros((), dtype=torch.float32), torch.zeros((), dtype=torch.long)
    rows = chunk_rows(output_weight.shape[0], chunk_size)
    for start in range(0, hidden.shape[0], rows):
        logits = _logits(hidden[start : start + rows], output_weight, dtype)  # (chunk, vocab) float32
        chunk_targets = targets[start : start + rows]
        total += F.cross_entropy(logits, chunk_targets, reduction="sum").cpu()
        correct += (logits.argmax(dim=-1) == chunk_targets).sum().cpu()
    return total, targets.new_tensor(targets.numel()).cpu(), correct


def sequence_logps(
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
    targets: torch.Tensor,
    owner: torch.Tensor,
    count: int,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the targets of ``count`` sequences (responses, continuations), and
    how many targets each sums.

    ``hidden`` (batch, seq, dim) predict ``targets`` (batch, seq; IGNORE_INDEX where nothing is
    scored); ``owner`` (batch, seq) is the sequence index (0..count-1) of each scored position.
    Only the scored positions go through the head. Returns two (count,) tensors: float32 sums and
    long counts.
    """
    rows, picked, mask = scored(hidden, targets)
    index = owner[mask]
    if bool((index < 0).any()) or bool((index >= count).any()):
        raise ValueError(f"a scored target belongs to no sequence (owner outside 0..{count - 1})")
    token_logps = target_logps(rows, output_weight, picked, chunk_size)  # (scored,)
    sums = token_logps.new_zeros(count).index_add(0, index, token_logps)
    tokens = torch.zeros(count, dtype=torch.long, device=targets.device).index_add(0, index, torch.ones_like(index))
    return sums, tokens


def chunked_cross_entropy(
    hidden: torch.Tensor, output_weight: torch.Tensor, targets: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ output_weight.T`` against ``targets`` (IGNORE_INDEX skipped),
    through :func:`target_logps` on the scored positions."""
    rows, picked, _ = scored(hidden, targets)
    return -target_logps(rows, output_weight, picked, chunk_size).sum()


# ---------------------------------------------------------------------------------- internals




def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` would compute in here: autocast's, or the inputs' own."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(chunk, vocab) float32 logits, the matmul in ``dtype`` with autocast off (the cast is explicit)."""
    with torch.autocast(hidden.device.type, enabled=False):
        return (hidden.to(dtype) @ weight.to(dtype).T).float()


class _TargetLogps(torch.autograd.Function):
    """log p(target) per row, chunk by chunk; the backward recomputes each chunk's logits.

    d logp_i / d logits_i = onehot(target_i) - softmax(logits_i), so a chunk's gradient needs only
    its logits (recomputed) and the logsumexp kept from the forward (one float per row).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows, dtype):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for start in range(0, hidden.shape[0], rows):
            logits = _logits(hidden[start : start + rows], weight, dtype)
            lse[start : start + rows] = torch.logsumexp(logits, dim=-1)
            out[start : start + rows] = logits.gather(1, targets[start : start + rows, None]).squeeze(1)
            del logits
        out -= lse
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.rows, ctx.dtype = rows, dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        rows, dtype = ctx.rows, ctx.dtype
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        weight_c = weight.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], rows):
                end = start + rows
                hidden_c, g = hidden[start:end].to(dtype), grad_out[start:end, None].float()
                # g * (onehot - softmax), built in place in the recomputed logits
                grad_logits = (hidden_c @ weight_c.T).float().sub_(lse[start:end, None]).exp_().mul_(-g)
                grad_logits.scatter_add_(1, targets[start:end, None], g)
                grad_logits = grad_logits.to(dtype)
                if want_hidden:
                    grad_hidden[start:end] = grad_logits @ weight_c
                if want_weight:
                    grad_weight += grad_logits.T @ hidden_c
        return grad_hidden, grad_weight, None, None, None
