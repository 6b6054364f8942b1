"""The reward model: the backbone plus a scalar value head read at a response's last token."""

from __future__ import annotations

import math

import torch
from torch import nn

from herd.model.transformer import Transformer


class RewardModel(nn.Module):
    """``backbone`` (a :class:`Transformer`) and ``head``, a Linear from dim to 1 without bias.

    The reward of a dialog is the head applied to the final normed hidden state of its last token
    (the ``<|eot_id|>`` that ends the response), as ``transformers``' ``LlamaForSequenceClassification``
    computes it. The backbone's output layer (the language-model head) is never used.
    """

    def __init__(self, backbone: Transformer) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.dim, 1, bias=False)
        if not self.head.weight.is_meta:
            init_value_head(self.head)

    @property
    def config(self):
        """The backbone's ModelConfig."""
        return self.backbone.config

    def forward(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        """tokens (batch, seq) -> the reward at every position (batch, seq), float32.

        ``kwargs`` go to the backbone (``document_ids``, ``response_ids``, ...).
        """
        hidden = self.backbone.hidden_states(tokens, **kwargs)  # (batch, seq, dim)
        return self.head(hidden).squeeze(-1).float()

    @torch.no_grad()
    def score(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Rewards (batch,) of right-padded rows: row i's reward is read at position ``lengths[i] - 1``.

        The head runs on those positions only; the backbone's output layer never runs.
        """
        hidden = self.backbone.hidden_states(tokens)  # causal: padding after a row's end changes nothing before it
        last = hidden[torch.arange(len(tokens), device=hidden.device), lengths.to(hidden.device) - 1]  # (batch, dim)
        return self.head(last).squeeze(-1).float()


@torch.no_grad()
def init_value_head(head: nn.Linear) -> None:
    """Normal(0, 1/sqrt(dim + 1)) weights: rewards start near 0 with unit-order gradients."""
    nn.init.normal_(head.weight, std=1 / math.sqrt(head.in_features + 1))
