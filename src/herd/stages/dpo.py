"""Direct preference optimisation (Llama 3 paper 4.1.4), on shared-prompt rows.

The policy and the reference both start from ``init_from``. For every ordered pair (chosen,
rejected) of a prompt's ranking (chosen has the lower rank; ties form no pair), with log-probs
summed over each response's content tokens (``role_mask & ~format_mask``: the paper masks the
header and termination tokens, for chosen and rejected alike)::

    loss_pair = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))          (dpo_loss)
    nll       = -(sum of pi log-probs over the chosen tokens) / (number of chosen tokens)
    loss      = mean over pairs of loss_pair + nll_weight * nll

With gradient accumulation (and data parallelism) the means run over the whole window: every pair
and every chosen token of the k micro-batches on all ranks (:mod:`herd.stages.accumulation`).
Log-probs come from the output layer applied to the scored positions only, in chunks
(:func:`herd.stages.preference.response_logps`), for the policy, the live reference and the
precomputed one alike: no (batch, seq, vocab) logits.

"Chosen" for the NLL term is the best-ranked response of each prompt. The paper's defaults:
beta 0.1, nll_weight 0.2, LR 1e-5. A prompt and all its responses share one row (the prompt is
encoded once, see :mod:`herd.stages.preference`).

The reference (``reference``):
- ``precompute`` (default): before the first update, one pass over every train and val row
  computes the reference log-probs with the policy itself (policy == reference at step 0) and
  keeps them (in checkpoints too), so no reference model is ever in memory during training.
- ``live``: a frozen copy of the starting model, built and sharded like the policy (FSDP2), is
  run on every batch.

Logs, per split: ``rewards/chosen``, ``rewards/rejected`` (``beta * (pi - ref)``), ``rewards/margin``,
``rewards/accuracy`` (chosen reward above rejected), ``logps/chosen`` (summed per chosen response),
``nll`` and ``loss``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from herd import logs
from herd.stages.base import BackboneStage
from herd.stages.preference import (
    Responses,
    best_ranked,
    check_preference_batch,
    find_responses,
    ranked_pairs,
    response_logps,
    response_token_counts,
)

REFERENCES = ("precompute", "live")
_METRICS = ("loss", "nll", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen")
logger = logs.get_logger(__name__)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses, and the implicit rewards of chosen and rejected.

    Every argument is a (batch,) tensor of summed log-probs of one response. Returns
    ``(losses, chosen_rewards, rejected_rewards)``, each (batch,): ``losses = -log sigmoid(beta *
    ((pc - rc) - (pr - rr)))`` and rewards ``beta * (policy - reference)`` (detached).
    """
    chosen_ratio = policy_chosen_logps - reference_chosen_logps
    rejected_ratio = policy_rejected_logps - reference_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def chosen_nll(logps: torch.Tensor, tokens: torch.Tensor, responses: Responses) -> torch.Tensor:
    """Mean negative log-likelihood of the chosen tokens: over the best-ranked response(s) of each prompt."""
    chosen = best_ranked(responses)
    return -logps[chosen].sum() / tokens[chosen].sum().clamp(min=1)


def row_key(tokens: torch.Tensor, response_ids: torch.Tensor) -> str:
    """A key for one row's precomputed reference log-probs: a digest of its tokens and response layout."""
    digest = hashlib.blake2b(tokens.cpu().numpy().tobytes(), digest_size=16)
    digest.update(response_ids.cpu().numpy().tobytes())
    return digest.hexdigest()


class DPOStage(BackboneStage):
    """DPO with an NLL term on the chosen responses; see the module docstring."""

    continues_model = True
    stage_name = "dpo"
    starts_from = "the policy to optimise (and its reference), e.g. an SFT export (logs/tiny_sft/runs/<run>/export)"
    summary_metrics = ("val/loss", "val/rewards/margin", "val/rewards/accuracy", "val/logps/chosen", "val/nll")
    next_token_loss = False

    def __init__(
        self,
        *args,
        init_from: str | None = None,
        beta: float = 0.1,
        nll_weight: float = 0.2,
        reference: str = "precompute",
        **kwargs,
    ) -> None:
        if reference not in REFERENCES:
            raise ValueError(f"stage.reference={reference!r}: use precompute (reference log-probs computed once "
                             "before training) or live (a frozen copy of the starting model)")
        if not beta > 0:
            raise ValueError(f"stage.beta must be positive, got {beta!r}")
        if nll_weight < 0:
            raise ValueError(f"stage.nll_weight must be >= 0, got {nll_weight!r}")
        super().__init__(*args, init_from=init_from, **kwargs)
        self.beta = float(beta)
        self.nll_weight = float(nll_weight)
        self.reference = reference
        self.reference_model: nn.Module | None = None
        self.reference_logps: dict[str, torch.Tensor] | None = None  # precompute: row key -> (responses,)
        self.val_metrics = nn.ModuleDict({name.replace("/", "_"): MeanMetric() for name in _METRICS})

    # ------------------------------------------------------------------------- reference

    def configure_model(self) -> None:
        """The policy, and with ``reference=live`` a frozen copy sharded the same way."""
        super().configure_model()
        if self.reference == "live" and self.reference_model is None:
            self.reference_model = self.build_backbone(trainable=False)

    def on_validation_start(self) -> None:
        self._ensure_reference()

    def on_train_start(self) -> None:
        self._ensure_reference()

    def _ensure_reference(self) -> None:
        """With ``precompute``: compute the reference log-probs once, before the first update."""
        if self.reference != "precompute" or self.reference_logps is not None:
            return
        if self.trainer.global_step > 0:
            raise RuntimeError(f"stage.reference=precompute: the checkpoint at step {self.trainer.global_step} holds "
                               "no reference log-probs, and the policy has moved since step 0; resume from a "
                               "checkpoint this stage wrote, or use stage.reference=live")
        self.reference_logps = self._precompute()

    @torch.no_grad()
    def _precompute(self) -> dict[str, torch.Tensor]:
        """One pass over every train and val row with the (untrained) policy; gathered from all ranks."""
        datamodule = self.trainer.datamodule
        was_training = self.model.training
        self.model.eval()
        table: dict[str, torch.Tensor] = {}
        for split in ("train", "val"):
            loader, steps = datamodule.pass_dataloader(split)
            logs.info(logger, f"stage.reference=precompute: reference log-probs of the {split} split, {steps} "
                              "batches per rank")
            batches = iter(loader)
            last = None
            for index in range(steps):  # every rank runs the same number of forwards (sharded models)
                if index and index % max(1, steps // 10) == 0:
                    logs.info(logger, f"  {split}: {index}/{steps} batches")
                batch = next(batches, None)
                fresh = batch is not None
                batch = batch if fresh else last
                if batch is None:
                    break
                last = batch
                batch = self.trainer.strategy.batch_to_device(batch)
                with self.trainer.precision_plugin.forward_context():
                    logps, responses = self._logps(self.model, batch)
                if fresh:
                    table.update(self._by_row(batch, responses, logps))
        self.model.train(was_training)
        table = _gather_tables(table)
        logs.info(logger, f"stage.reference=precompute: reference log-probs of {len(table)} rows computed")
        return table

    @staticmethod
    def _by_row(batch: dict[str, torch.Tensor], responses: Responses, logps: torch.Tensor) -> dict[str, torch.Tensor]:
        table = {}
        logps = logps.detach().float().cpu()
        rows = responses.rows.cpu()
        for row in torch.unique(rows).tolist():
            key = row_key(batch["tokens"][row], batch["response_ids"][row])
            table[key] = logps[rows == row].clone()
        return table

    def _reference_logps(self, batch: dict[str, torch.Tensor], responses: Responses) -> torch.Tensor:
        if self.reference == "live":
            with torch.no_grad():
                return self._logps(self.reference_model, batch)[0]
        rows = responses.rows.cpu()
        parts = []
        for row in torch.unique(rows).tolist():
            key = row_key(batch["tokens"][row], batch["response_ids"][row])
            if key not in self.reference_logps:
                raise RuntimeError("a batch row has no precomputed reference log-probs: the data changed since "
                                   "they were computed (re-prepared?); start a new run, or use stage.reference=live")
            parts.append(self.reference_logps[key])
        return torch.cat(parts).to(responses.rows.device)

    # ------------------------------------------------------------------------------ loss

    def _logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Responses]:
        """Summed log-probs (R,) of each response's content tokens under ``model``."""
        logps, _, responses = self._response_logps(model, batch)
        return logps, responses

    def _response_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        """(summed log-probs (R,), scored tokens (R,), responses): the output layer runs on the scored
        positions only, one chunk at a time (no (batch, seq, vocab) logits)."""
        responses = find_responses(batch)
        hidden = model.hidden_states(batch["tokens"], document_ids=batch["document_ids"],
                                     response_ids=batch["response_ids"])  # (batch, seq, dim)
        logps, tokens = response_logps(hidden, model.output.weight, batch["targets"], responses.token_response,
                                       responses.count)
        return logps, tokens, responses

    def loss_counts(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The DPO term is a mean over pairs, the NLL term a mean over the chosen responses' tokens."""
        check_preference_batch(batch, "dpo")
        responses = find_responses(batch)
        better, _ = ranked_pairs(responses.ranks, responses.groups)
        tokens = response_token_counts(batch["targets"], responses.token_response, responses.count)
        return {"pairs": torch.tensor(better.numel()), "chosen_tokens": tokens[best_ranked(responses)].sum()}

    def terms(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
        """The batch's loss terms as sums ({"pairs": sum of pair losses, "chosen_tokens": nll_weight x the
        chosen tokens' summed NLL}, divided by the counts of :meth:`loss_counts`), its metrics (the
        batch's own loss among them), and its number of pairs."""
        check_preference_batch(batch, "dpo")
        logps, tokens, responses = self._response_logps(self.model, batch)
        reference = self._reference_logps(batch, responses)
        better, worse = ranked_pairs(responses.ranks, responses.groups)
        if better.numel() == 0:
            raise ValueError("a DPO batch holds no pair of responses with different ranks")
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            logps[better], logps[worse], reference[better], reference[worse], self.beta
        )
        chosen = best_ranked(responses)
        chosen_tokens = tokens[chosen].sum().clamp(min=1)
        nll_sum = -logps[chosen].sum()
        sums = {"pairs": losses.sum(), "chosen_tokens": self.nll_weight * nll_sum}
        nll = nll_sum / chosen_tokens
        loss = losses.mean() + self.nll_weight * nll
        metrics = {
            "loss": loss.detach(),
            "nll": nll.detach(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": logps[better].detach().mean(),
        }
        return sums, metrics, int(better.numel())

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """The loss of a batch on its own (mean over its pairs + nll_weight x its chosen tokens' mean NLL),
        its metrics, and the number of pairs."""
        sums, metrics, pairs = self.terms(batch)
        counts = self.loss_counts(batch)
        loss = sum(value / counts[term].clamp(min=1).to(value.device) for term, value in sums.items())
        return loss, metrics, pairs

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The DPO loss over the whole accumulation window on every rank: the pair term averaged over all
        its pairs, the NLL term over all its chosen tokens (see :mod:`herd.stages.accumulation`)."""
        sums, metrics, _ = self.terms(batch)
        self.count_tokens(batch["tokens"])
        sync = self.trainer.world_size > 1
        for name, value in metrics.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, prog_bar=name == "loss", sync_dist=sync)
        self.log("train/tokens_seen", float(self.tokens_seen), on_step=True, on_epoch=False)
        return self.window_loss(sums, batch)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        _, metrics, pairs = self.step(batch)
        for name, value in metrics.items():
            self.val_metrics[name.replace("/", "_")].update(value, weight=pairs)

    def on_validation_epoch_end(self) -> None:
        for name in _METRICS:
            metric = self.val_metrics[name.replace("/", "_")]
            if metric.update_count > 0:
                self.log(f"val/{name}", metric.compute(), prog_bar=name == "loss", sync_dist=False)
            metric.reset()

    # ------------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also keep the precomputed reference log-probs (the policy has moved since they were computed)."""
        super().on_save_checkpoint(checkpoint)
        if self.reference_logps is not None:
            checkpoint["herd"]["dpo_reference_logps"] = {k: v.tolist() for k, v in self.reference_logps.items()}

    def data_bound_state(self, herd: dict[str, Any]) -> str | None:
        """The precomputed reference log-probs, keyed by the rows they were computed on."""
        if self.reference == "precompute" and herd.get("dpo_reference_logps") is not None:
            return "its precomputed reference log-probs (stage.reference=precompute), computed row by row on that data"
        return None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        stored = checkpoint.get("herd", {}).get("dpo_reference_logps")
        if stored is not None:
            self.reference_logps = {k: torch.tensor(v, dtype=torch.float32) for k, v in stored.items()}


def _gather_tables(table: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Merge every rank's table (each rank computed its share of the rows)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return table
    gathered: list[dict[str, list[float]] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, {k: v.tolist() for k, v in table.items()})
    return {k: torch.tensor(v) for part in gathered for k, v in part.items()}
