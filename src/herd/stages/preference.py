"""What the reward and DPO stages share: the responses of shared-prompt batches, the pairs of their
rankings, and per-response log-probabilities.

A preference batch (from a ``preference`` source of ``herd.prepare``) holds, besides ``tokens``,
``document_ids`` and ``targets``, two (batch, seq) tensors:

- ``response_ids``: 0 on a prompt (and on padding), k = 1, 2, ... on the k-th response that follows
  that prompt in the row; each prompt and its responses form one document (one ``document_ids``
  value), encoded once and attended as the backbone's shared-prompt rows
  (:mod:`herd.model.attention`);
- ``ranks``: the rank of the response a token belongs to (0 best; equal ranks are ties), -1
  outside responses.

``targets`` are the next token where that token is part of a response's content (the chat
format's ``role_mask & ~format_mask``: no header, no ``<|eot_id|>``), -100 elsewhere. Every
response ends with its own ``<|eot_id|>``, where the reward model reads its score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from herd.constants import IGNORE_INDEX
from herd.model.loss import sequence_logps

PREFERENCE_KEYS = ("response_ids", "ranks")


@dataclass(frozen=True)
class Responses:
    """The responses of a batch, in row-major order of their first token.

    ``rows`` and ``ends`` (R,): the batch row of each response and the position of its last token;
    ``ranks`` (R,): its rank; ``groups`` (R,): the index (0..G-1) of the prompt it answers;
    ``token_response`` (batch, seq): the response index of every token, -1 outside responses.
    """

    rows: torch.Tensor
    ends: torch.Tensor
    ranks: torch.Tensor
    groups: torch.Tensor
    token_response: torch.Tensor

    @property
    def count(self) -> int:
        """Number of responses."""
        return int(self.rows.numel())


def check_preference_batch(batch: dict[str, torch.Tensor], stage: str) -> None:
    """Refuse a batch that is not preference data, naming the fix."""
    missing = [key for key in PREFERENCE_KEYS if key not in batch]
    if missing:
        raise ValueError(
            f"stage={stage} trains on preference rankings, but the batch has no {missing}: point data.data_dir "
            "at data prepared from a preference source (e.g. make prepare-preferences, or herd.prepare with "
            "sources.<name>.kind=preference)"
        )


def find_responses(batch: dict[str, torch.Tensor]) -> Responses:
    """Locate every response of a preference batch (see the module docstring)."""
    response_ids, document_ids = batch["response_ids"], batch["document_ids"]
    in_response = response_ids > 0
    same_as_next = torch.zeros_like(in_response)
    same_as_next[:, :-1] = (response_ids[:, 1:] == response_ids[:, :-1]) & (
        document_ids[:, 1:] == document_ids[:, :-1]
    )
    same_as_previous = torch.zeros_like(in_response)
    same_as_previous[:, 1:] = same_as_next[:, :-1]
    starts = in_response & ~same_as_previous
    ends = in_response & ~same_as_next
    rows, last = ends.nonzero(as_tuple=True)  # row-major, like the starts below
    token_response = torch.cumsum(starts.flatten(), 0).view_as(starts) - 1
    token_response = torch.where(in_response, token_response, torch.full_like(token_response, -1))
    ranks = batch["ranks"][rows, last]
    prompt_key = rows * (int(document_ids.max()) + 2) + document_ids[rows, last]
    groups = torch.unique(prompt_key, return_inverse=True)[1]
    return Responses(rows, last, ranks, groups, token_response)


def ranked_pairs(ranks: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ordered pair (better, worse) of responses to one prompt: indices with a lower rank first.

    Responses of equal rank (ties) form no pair.
    """
    better = (groups[:, None] == groups[None, :]) & (ranks[:, None] < ranks[None, :])  # (R, R)
    return better.nonzero(as_tuple=True)


def response_logps(
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
    targets: torch.Tensor,
    token_response: torch.Tensor,
    count: int,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each response's target tokens, and how many tokens each sums.

    ``hidden`` (batch, seq, dim) are the final normed hidden states (``model.hidden_states``),
    ``output_weight`` the output layer's (vocab, dim) weight; position p predicts ``targets`` (batch,
    seq; -100 where nothing is scored), token p + 1, which belongs to the response of position p
    (``token_response``). Only the scored positions go through the output layer, one chunk at a time
    (:func:`herd.model.loss.sequence_logps`): no (batch, seq, vocab) logits. Returns two (count,)
    tensors: float32 sums and long counts.
    """
    index = token_response[targets != IGNORE_INDEX]
    if bool((index < 0).any()):
        raise ValueError("a scored target lies outside every response: the batch's targets and response_ids "
                         "disagree (re-run herd.prepare)")
    return sequence_logps(hidden, output_weight, targets, token_response, count, chunk_size)


def response_token_counts(targets: torch.Tensor, token_response: torch.Tensor, count: int) -> torch.Tensor:
    """How many scored target tokens each of ``count`` responses has (count,), from the batch alone."""
    index = token_response[targets != IGNORE_INDEX]
    return torch.zeros(count, dtype=torch.long, device=targets.device).index_add(0, index, torch.ones_like(index))


def best_ranked(responses: Responses) -> torch.Tensor:
    """(R,) bool: the best-ranked response(s) of each prompt (the "chosen" of the NLL term)."""
    best_rank = torch.full((int(responses.groups.max()) + 1,), torch.iinfo(responses.ranks.dtype).max,
                           dtype=responses.ranks.dtype, device=responses.ranks.device)
    best_rank = best_rank.scatter_reduce(0, responses.groups, responses.ranks, reduce="amin")
    return responses.ranks == best_rank[responses.groups]


def pair_accuracy(better_scores: torch.Tensor, worse_scores: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 when the better response scores higher, 0.5 on a tie, 0 otherwise."""
    return (better_scores > worse_scores).float() + 0.5 * (better_scores == worse_scores).float()
