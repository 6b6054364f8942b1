"""Reward modeling (Llama 3 paper 4.1.2): the backbone plus a scalar head, trained on rankings.

Each example is a prompt and 2..K ranked responses (edited > chosen > rejected in the paper),
laid out in ONE row: the prompt once, then every response, each attending to the prompt and to
itself only (see :mod:`herd.stages.preference`). The reward of a response is the value head (a
Linear from dim to 1, no bias) on the final hidden state of its last token, its ``<|eot_id|>``.

The loss of one prompt is the mean, over every ordered pair (better, worse) of its ranking, of
``-log sigmoid(r_better - r_worse)``, without a margin term (:func:`ranking_loss`); tied ranks form
no pair. A batch's loss is the mean over its prompts; with gradient accumulation (and data
parallelism) the mean runs over every prompt of the window on all ranks
(:mod:`herd.stages.accumulation`). The language-model head never runs: the rewards come from
the backbone's final hidden states (``hidden_states``) at the responses' last tokens only. Validation logs ``val/loss`` and the
pairwise accuracy ``val/accuracy`` (a tied score counts 0.5), overall and per pair of ranks
(``val/accuracy_0v1``: rank 0 against rank 1, and so on for ranks up to 2).

The export is a ``LlamaForSequenceClassification`` directory (num_labels 1; the head is its
``score.weight``) that ``transformers`` loads as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torchmetrics import MeanMetric

from herd.interop import hf
from herd.model.reward import init_value_head
from herd.stages.base import BackboneStage
from herd.stages.parallelize import fsdp_mesh
from herd.stages.preference import check_preference_batch, find_responses, pair_accuracy, ranked_pairs

# Rank pairs with their own accuracy in the logs (the paper ranks 2-3 responses).
LOGGED_RANK_PAIRS = ((0, 1), (0, 2), (1, 2))
VALUE_HEAD_KEY = "value_head.weight"


def ranking_loss(rewards: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """The ranking loss of ONE prompt's responses: mean over pairs of ``-log sigmoid(r_better - r_worse)``.

    ``rewards`` and ``ranks`` are 1-D over the responses; a lower rank is better; tied ranks form
    no pair. A ranking without any pair (every rank tied) is refused.
    """
    if rewards.ndim != 1 or rewards.shape != ranks.shape:
        raise ValueError(f"ranking_loss takes two 1-D tensors of the same length, got {tuple(rewards.shape)} "
                         f"and {tuple(ranks.shape)}")
    return grouped_ranking_loss(rewards, ranks, torch.zeros_like(ranks))


def grouped_ranking_loss(rewards: torch.Tensor, ranks: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """:func:`ranking_loss` of each prompt (responses grouped by ``groups``), averaged over the prompts."""
    return prompt_ranking_losses(rewards, ranks, groups).mean()


def prompt_ranking_losses(rewards: torch.Tensor, ranks: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """:func:`ranking_loss` of each prompt that has a pair, (prompts with a pair,); refused without any pair."""
    better, worse = ranked_pairs(ranks, groups)
    if better.numel() == 0:
        raise ValueError("the ranking has no pair of responses with different ranks: nothing to learn from")
    losses = -F.logsigmoid(rewards[better] - rewards[worse])  # (pairs,)
    pair_groups = groups[better]
    pairs_per_group = torch.bincount(pair_groups, minlength=int(groups.max()) + 1).to(losses.dtype)
    per_group = losses.new_zeros(pairs_per_group.shape).index_add(0, pair_groups, losses) / pairs_per_group.clamp(min=1)
    return per_group[pairs_per_group > 0]


def ranked_prompts(ranks: torch.Tensor, groups: torch.Tensor) -> int:
    """How many prompts (``groups``) have at least one pair of different ranks."""
    better, _ = ranked_pairs(ranks, groups)
    return int(torch.unique(groups[better]).numel())


class RewardStage(BackboneStage):
    """Backbone + value head on ranked responses; see the module docstring.

    ``init_from`` (required) is a Llama directory (the head starts from a small random init) or a
    reward-model directory (the head continues from its ``score.weight``).
    """

    starts_from_reward_models = True
    summary_metrics = ("val/loss", "val/accuracy", *(f"val/accuracy_{a}v{b}" for a, b in LOGGED_RANK_PAIRS))
    next_token_loss = False

    continues_model = True
    stage_name = "reward"
    starts_from = ("the model to turn into a reward model, e.g. an SFT export (logs/tiny_sft/runs/<run>/export) or a "
                   "Llama 3 checkpoint, or a reward model to continue")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.value_head: nn.Linear | None = None
        self.val_loss = MeanMetric()
        self.val_accuracy = MeanMetric()
        self.val_rank_accuracy = nn.ModuleDict({f"{a}v{b}": MeanMetric() for a, b in LOGGED_RANK_PAIRS})

    def configure_model(self) -> None:
        """The backbone (its language-model head frozen: a reward model never uses it), then the value head."""
        super().configure_model()
        if self.value_head is not None:
            return
        if not self.model_config.tie_embeddings:
            self.model.output.requires_grad_(False)
        head = nn.Linear(self.model_config.dim, 1, bias=False, device=self.model.norm.weight.device)
        if self.init_from is not None and hf.is_reward_model(self.init_from):
            head.weight.data.copy_(hf.read_reward_head(self.init_from, self.model_config.dim))
        else:
            init_value_head(head)
        if self._device_mesh is not None:  # sharded with the backbone, so its gradients are reduced too
            fully_shard(head, mesh=fsdp_mesh(self._device_mesh))
        self.value_head = head

    def trained_modules(self) -> list[nn.Module]:
        """The backbone and the value head."""
        return [self.model, self.value_head]

    def rewards(self, batch: dict[str, torch.Tensor]):
        """The reward of every response of a preference batch: (rewards (R,) float32, responses)."""
        check_preference_batch(batch, "reward")
        responses = find_responses(batch)
        hidden = self.model.hidden_states(batch["tokens"], document_ids=batch["document_ids"],
                                          response_ids=batch["response_ids"])  # (batch, seq, dim)
        last = hidden[responses.rows, responses.ends]  # (R, dim): each response's <|eot_id|>
        return self.value_head(last).squeeze(-1).float(), responses

    def loss_counts(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The loss is a mean over the prompts that have a pair."""
        check_preference_batch(batch, "reward")
        responses = find_responses(batch)
        return {"prompts": torch.tensor(ranked_prompts(responses.ranks, responses.groups))}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The ranking loss averaged over every prompt of the accumulation window on every rank."""
        rewards, responses = self.rewards(batch)
        per_prompt = prompt_ranking_losses(rewards, responses.ranks, responses.groups)
        better, worse = ranked_pairs(responses.ranks, responses.groups)
        self.count_tokens(batch["tokens"])
        sync = self.trainer.world_size > 1
        self.log("train/loss", per_prompt.detach().mean(), on_step=True, on_epoch=False, prog_bar=True, sync_dist=sync)
        self.log("train/accuracy", pair_accuracy(rewards[better], rewards[worse]).mean(), on_step=True,
                 on_epoch=False, sync_dist=sync)
        self.log("train/tokens_seen", float(self.tokens_seen), on_step=True, on_epoch=False)
        return self.window_loss({"prompts": per_prompt.sum()}, batch)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        rewards, responses = self.rewards(batch)
        better, worse = ranked_pairs(responses.ranks, responses.groups)
        if better.numel() == 0:
            return
        n_prompts = ranked_prompts(responses.ranks, responses.groups)
        self.val_loss.update(grouped_ranking_loss(rewards, responses.ranks, responses.groups), weight=n_prompts)
        correct = pair_accuracy(rewards[better], rewards[worse])
        self.val_accuracy.update(correct)
        for a, b in LOGGED_RANK_PAIRS:
            chosen = (responses.ranks[better] == a) & (responses.ranks[worse] == b)
            if bool(chosen.any()):
                self.val_rank_accuracy[f"{a}v{b}"].update(correct[chosen])

    def on_validation_epoch_end(self) -> None:
        metrics = {"val/loss": self.val_loss, "val/accuracy": self.val_accuracy,
                   **{f"val/accuracy_{name}": metric for name, metric in self.val_rank_accuracy.items()}}
        for name, metric in metrics.items():
            if metric.update_count > 0:  # a rank pair the data never holds is not logged
                self.log(name, metric.compute(), prog_bar=name == "val/loss", sync_dist=False)
            metric.reset()

    def export_state(self) -> dict[str, torch.Tensor]:
        """The backbone's full weights and the value head (under ``value_head.weight``)."""
        weight = self.value_head.weight.detach()
        if isinstance(weight, DTensor):  # a collective: every rank calls export_state
            weight = weight.full_tensor()
        return {**super().export_state(), VALUE_HEAD_KEY: weight.cpu()}

    def save_export(self, path: Path, state: dict[str, torch.Tensor], tokenizer: Any = None) -> Path:
        """A ``LlamaForSequenceClassification`` directory (num_labels 1, the head as ``score.weight``)."""
        state = dict(state)
        head = state.pop(VALUE_HEAD_KEY)
        return hf.save_reward_model(self.model, head, path, tokenizer=tokenizer, state_dict=state)
