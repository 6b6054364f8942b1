"""What every stage shares: building the backbone, the optimizer and schedule, token accounting.

A stage subclasses :class:`BackboneStage`, writes ``training_step``/``validation_step`` with its own
loss, and gets from here:
- ``configure_model``: the backbone from a ModelConfig, or from a Hugging Face directory (``init_from``;
  a llama.cpp ``.gguf`` file is converted into one once, see :mod:`herd.interop.gguf`), with
  activation checkpointing applied from outside;
- ``configure_optimizers``: AdamW (or any ``_partial_`` optimizer) with no weight decay on norms
  and a per-step schedule;
- ``tokens_seen``, counted over all ranks and stored in checkpoints;
- exact gradient accumulation (:mod:`herd.stages.accumulation`): a stage names the counts its
  loss divides by (:meth:`BackboneStage.loss_counts`) and divides its sums by those of the whole
  accumulation window on every rank (:meth:`BackboneStage.window_loss`);
- gradient-norm logging before clipping;
- non-finite losses (``on_nonfinite``): stop with a clear error, or skip the step's update; and
  no checkpoint is ever written from non-finite weights.

The adapter stages (vision, speech) subclass :class:`AdapterStage`, which adds a frozen backbone
(and the checks that prove it), the adapter model's build and the next-token loss on the trained
positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.distributed.tensor import DTensor
from torchmetrics import MeanMetric, Metric

from herd import logs
from herd.constants import IGNORE_INDEX
from herd.data.loaders.ranks import data_parallel_size
from herd.interop import gguf, hf
from herd.model import ModelConfig, Transformer
from herd.model.context import ContextParallel
from herd.model.context import local as context_local
from herd.model.loss import target_logps, target_scores
from herd.stages import accumulation
from herd.stages.parallelize import (
    apply_activation_checkpointing,
    apply_fsdp,
    apply_tensor_parallel,
    checkpoint_every,
    compile_blocks,
    fsdp_mesh,
    full_state_dict,
    grad_norm,
    scale_grads,
    shard_adapter_model,
)
from herd.stages.schedule import WarmupCosineAnneal

ON_NONFINITE = ("stop", "skip_step")
logger = logs.get_logger(__name__)


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient or weight; the message gives the step and the fix."""


def check_init_from(stage: type[BackboneStage], init_from: str | None, allow_random_init: bool) -> None:
    """The one rule for the stages that continue a trained model: no ``init_from`` is refused, unless
    ``allow_random_init`` (tests, smoke runs), which starts from random weights with a warning."""
    if not stage.continues_model or init_from:
        return
    if not allow_random_init:
        raise ValueError(f"stage={stage.stage_name} continues a trained model and needs stage.init_from=<model "
                         f"directory>: {stage.starts_from}; or stage.allow_random_init=true to start from random "
                         "weights on purpose (tests, smoke runs)")
    logs.warning(logger, f"stage.allow_random_init=true: stage={stage.stage_name} starts from random weights, which "
                         "it cannot learn anything useful from (fine for tests and smoke runs)")


class BackboneStage(L.LightningModule):
    """A LightningModule around one :class:`~herd.model.Transformer`."""

    # Whether stage.init_from may be a reward-model directory (only the reward stage continues one).
    starts_from_reward_models = False
    # A stage that continues a trained model (long context, SFT, reward, DPO, the adapters) refuses to
    # start without stage.init_from (check_init_from), naming itself and what it starts from.
    continues_model = False
    stage_name = "pretrain"
    starts_from = ""
    # The end-of-run summary: the metrics it prints (start -> end), and whether val/loss is a
    # next-token loss (then it is compared with a uniform guess and the data's unigram entropy).
    summary_metrics: tuple[str, ...] = ("val/loss", "val/accuracy", "val/answer_f1")
    next_token_loss = True
    # Whether the stage's losses run under context parallelism (strategy.context_parallel_size > 1).
    supports_context_parallel = False

    def __init__(
        self,
        model: ModelConfig | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        init_from: str | None = None,
        anneal_tokens: int = 0,
        activation_checkpointing: str | int | None = None,
        fsdp: dict[str, Any] | None = None,
        compile_blocks: bool = False,
        meta_init: bool | None = None,
        on_nonfinite: str = "stop",
        max_consecutive_skips: int = 10,
        allow_random_init: bool = False,
    ) -> None:
        super().__init__()
        check_init_from(type(self), init_from, allow_random_init)
        if model is None and init_from is None:
            raise ValueError(
                "a stage needs a model config (model=...) or a model directory (stage.init_from=...)"
            )
        self.model_config = model
        self.optimizer_factory = optimizer or (lambda params: torch.optim.AdamW(params, lr=3e-4))
        self.scheduler_factory = scheduler
        if init_from is not None:  # a .gguf file becomes its converted directory (once, cached)
            init_from = str(gguf.model_dir(init_from))
        self.init_from = init_from
        self.anneal_tokens = anneal_tokens
        self.activation_checkpointing = activation_checkpointing
        checkpoint_every(activation_checkpointing)  # validate now, not after setup
        self.fsdp_options = dict(fsdp or {})
        unknown = sorted(set(self.fsdp_options) - {"param_dtype", "reduce_dtype", "reshard_after_forward"})
        if unknown:
            raise ValueError(f"unknown stage.fsdp key(s) {unknown}; valid: param_dtype, reduce_dtype, "
                             "reshard_after_forward")
        self.compile_blocks = compile_blocks
        self.meta_init = meta_init
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"stage.on_nonfinite={on_nonfinite!r}: use stop (end the run with an error) or "
                             "skip_step (drop that step's update and go on)")
        if not isinstance(max_consecutive_skips, int) or max_consecutive_skips < 1:
            raise ValueError(f"stage.max_consecutive_skips must be a positive integer, got {max_consecutive_skips!r}")
        self.on_nonfinite = on_nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps = 0
        self._consecutive_skips = 0
        self._step_loss: torch.Tensor | None = None
        self.model: Transformer | None = None
        self.tokens_seen = 0
        self.start_metrics: dict[str, float] = {}  # validation before training (the summary's "from")
        # the run's resolved config and data fingerprint (set by herd.train), kept in every checkpoint so that a
        # resume can tell what would change: {"config": {...}, "data": "<fingerprint>" or None}
        self.run_record: dict[str, Any] | None = None
        self.lr_schedule: WarmupCosineAnneal | None = None
        self._grad_norm: torch.Tensor | None = None
        if init_from is not None and not (Path(init_from) / "config.json").is_file():
            raise FileNotFoundError(
                f"stage.init_from={init_from} is not a model directory (no config.json there)"
            )
        if init_from is not None and hf.is_reward_model(init_from) and not self.starts_from_reward_models:
            raise ValueError(f"stage.init_from={init_from} is a reward model (LlamaForSequenceClassification), which "
                             "has no language-model head: start this stage from a policy directory (the export of "
                             "a pretraining, SFT or DPO run)")

    # ------------------------------------------------------------------------------- model

    def configure_model(self) -> None:
        """Build (or load) the backbone once, then parallelise it from outside.

        Under Lightning's ModelParallelStrategy (strategy=fsdp2 / fsdp2_tp) the device mesh is set:
        tensor parallel, activation checkpointing, per-block compile and FSDP2 are applied in that
        order. Models of a billion parameters or more (or ``meta_init=true``) are built on the meta
        device and materialised shard by shard, so no rank ever holds the whole model.
        """
        if self.model is not None:
            return
        self.model = self.build_backbone()
        self.model_config = self.model.config

    def build_backbone(self, trainable: bool = True) -> Transformer:
        """A backbone from ``init_from`` (or the model config), parallelised like the trained one.

        Stages that need a second copy (DPO's frozen reference) call this with
        ``trainable=False``: the copy gets no activation checkpointing or compile, its parameters
        do not require gradients, and under FSDP2 it is sharded over the same mesh.
        """
        mesh = self._device_mesh
        self._check_context_parallel(mesh)
        meta = mesh is not None and self.init_from is None and self._wants_meta_init()
        if self.init_from is not None:
            model = hf.load(self.init_from, dtype=torch.float32, config=self.model_config)
        else:
            with torch.device("meta") if meta else nullcontext():
                model = Transformer(self.model_config)
        if not trainable:
            model.requires_grad_(False).eval()
        if mesh is not None and mesh["tensor_parallel"].size() > 1:
            apply_tensor_parallel(model, mesh["tensor_parallel"])
        if trainable:
            apply_activation_checkpointing(model, self.activation_checkpointing)
            if self.compile_blocks:
                compile_blocks(model)
        if mesh is not None:
            apply_fsdp(model, fsdp_mesh(mesh), **self.fsdp_options)
        if meta:
            model.to_empty(device=self.trainer.strategy.root_device)
            model.init_weights()
        return model

    def _check_context_parallel(self, mesh) -> None:
        names = (mesh.mesh_dim_names or ()) if mesh is not None else ()
        size = mesh["context_parallel"].size() if "context_parallel" in names else 1
        if size > 1 and not self.supports_context_parallel:
            raise ValueError(f"{type(self).__name__} does not run under context parallelism (strategy."
                             f"context_parallel_size={size}): use it with stage=pretrain, long_context or sft, or set "
                             "strategy.context_parallel_size=1")

    @property
    def context(self) -> ContextParallel | None:
        """The group this rank shares its rows with under context parallelism (None: whole rows).

        The strategy owns it (``strategy=fsdp2_cp``); a context stage may change it between epochs.
        """
        strategy = self._trainer.strategy if self._trainer is not None else None
        active = getattr(strategy, "active_context_parallel", None)
        return active() if active is not None else None

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's places of a (batch, seq) tensor of whole rows under context parallelism; else itself."""
        return context_local(tensor, self.context)

    def _wants_meta_init(self) -> bool:
        return self.meta_init if self.meta_init is not None else self.model_config.num_params() >= 1e9

    def forward(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        """Logits of the backbone."""
        return self.model(tokens, **kwargs)

    # ----------------------------------------------------------------------------- export

    def export_state(self) -> dict[str, torch.Tensor]:
        """The full weights to export (herd names). A collective when the model is sharded: every rank calls it."""
        return full_state_dict(self.model)

    def save_export(self, path: Path, state: dict[str, torch.Tensor], tokenizer: Any = None) -> Path:
        """Write ``state`` (from :meth:`export_state`) as the stage's model directory; rank 0 calls it.

        The default is a Hugging Face Llama directory (``LlamaForCausalLM``); a stage whose model is
        something else (the reward model) overrides this.
        """
        return hf.save(self.model, path, tokenizer=tokenizer, state_dict=state)

    # -------------------------------------------------------------------------- optimizer

    def configure_optimizers(self) -> dict[str, Any]:
        """The partial optimizer over decay/no-decay groups, plus the per-step LR schedule."""
        optimizer = self.optimizer_factory(self.optimizer_groups())
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer, **self._schedule_lengths())
        self.lr_schedule = next(
            (f for f in getattr(scheduler, "lr_lambdas", []) if isinstance(f, WarmupCosineAnneal)), None
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def trained_modules(self) -> list[nn.Module]:
        """The modules whose parameters (those that require gradients) the optimizer updates."""
        return [self.model]

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: :func:`parameter_groups` of :meth:`trained_modules`."""
        return parameter_groups(self.trained_modules(), self._weight_decay())

    def _weight_decay(self) -> float:
        keywords = getattr(self.optimizer_factory, "keywords", {})
        return float(keywords.get("weight_decay", 0.0))

    def _schedule_lengths(self) -> dict[str, int]:
        keywords = getattr(self.scheduler_factory, "keywords", {})
        lengths = {}
        if keywords.get("total_steps") is None:
            # a schedule that ends the run (long context) has a planned length; so may max_steps
            limits = [c.planned_steps(self.trainer) for c in self.trainer.callbacks if hasattr(c, "planned_steps")]
            if self.trainer.max_steps is not None and self.trainer.max_steps > 0:
                limits.append(self.trainer.max_steps)
            if not limits:
                raise ValueError("the LR schedule needs trainer.max_steps (or stage.scheduler.total_steps)")
            lengths["total_steps"] = min(limits)
        if self.anneal_tokens:
            total = lengths.get("total_steps", keywords.get("total_steps"))
            anneal_steps = math.ceil(self.anneal_tokens / self.final_tokens_per_step())
            if anneal_steps > total:
                rank_zero_warn(f"stage.anneal_tokens={self.anneal_tokens} needs {anneal_steps} steps, more than the "
                               f"run's {total}: the whole run anneals")
            lengths["anneal_steps"] = min(anneal_steps, total)
        return lengths

    def final_tokens_per_step(self) -> int:
        """Global batch in tokens at the end of training (after any batch-size ramp)."""
        for callback in self.trainer.callbacks:
            if hasattr(callback, "final_tokens_per_step"):
                return callback.final_tokens_per_step(self.trainer)
        datamodule = self.trainer.datamodule
        return datamodule.batch_size * datamodule.seq_len * data_parallel_size(self.trainer)

    # ------------------------------------------------------------------------- accounting

    def setup(self, stage: str) -> None:
        """For fitting: tag the train batches with their accumulation window's counts
        (:func:`herd.stages.accumulation.install`)."""
        if stage == "fit" and self._trainer is not None:
            accumulation.install(self.trainer, self.loss_counts)

    def loss_counts(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """What this stage's training loss divides by, counted in one micro-batch from the batch alone
        (no model): {term: int64 scalar}. Here the predicted tokens (``targets`` != -100); under context
        parallelism those of this rank's places, so that the sum over every rank counts each token once."""
        return {"tokens": (self.local(batch["targets"]) != IGNORE_INDEX).sum()}

    def window_totals(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], float]:
        """The totals of :meth:`loss_counts` over the batch's accumulation window on every rank, and the
        factor k * W (``accumulate_grad_batches`` x world size) that undoes Lightning's division by k and
        the data-parallel mean (see :mod:`herd.stages.accumulation`). A batch without its window's
        counts (validation, a dataloader without a DataModule) gives its own counts and factor 1."""
        window = batch.get(accumulation.WINDOW_KEY) if self._trainer is not None else None
        if window is None:
            return self.loss_counts(batch), 1.0
        terms = list(window)
        total = torch.stack([window[term].to(torch.long) for term in terms])
        world = self.trainer.world_size
        if world > 1:
            torch.distributed.all_reduce(total)  # sum over the ranks (every rank runs every micro-batch)
        factor = float(self.trainer.accumulate_grad_batches * world)
        return dict(zip(terms, total.unbind(0), strict=True)), factor

    def window_loss(self, sums: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        """The loss to return from ``training_step``: sum over terms of ``sums[term]`` (this micro-batch's)
        divided by the window's total of that term, times the factor of :meth:`window_totals`. Its
        gradient, accumulated and averaged as Lightning does, is that of the whole window as one batch."""
        totals, factor = self.window_totals(batch)
        return sum(value * (factor / totals[term].clamp(min=1).to(value.dtype)) for term, value in sums.items())

    def count_tokens(self, tokens: torch.Tensor) -> int:
        """Add this step's global token count to ``tokens_seen``: every data-parallel replica reads an equal
        batch of whole rows (tensor- and context-parallel ranks of a replica read the same rows)."""
        self.tokens_seen += tokens.numel() * data_parallel_size(self.trainer)
        return self.tokens_seen

    def on_before_backward(self, loss: torch.Tensor) -> None:
        """Remember this step's loss (the last micro-batch's, or the first non-finite one)."""
        if self._step_loss is None or torch.isfinite(self._step_loss):
            self._step_loss = loss.detach()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the gradient norm before clipping and the learning rate; act on a non-finite step."""
        self._grad_norm = grad_norm(self.parameters())
        loss, self._step_loss = self._step_loss, None
        local_bad = not bool(torch.isfinite(self._grad_norm)) or (loss is not None and not bool(torch.isfinite(loss)))
        # every rank takes the same decision (a NaN on one rank reaches all through the gradient all-reduce)
        bad = self.trainer.strategy.reduce_boolean_decision(local_bad, all=False)
        if bad:
            self._on_nonfinite_step(optimizer, loss)
        else:
            self._consecutive_skips = 0
        self.log("train/grad_norm", self._grad_norm, on_step=True, on_epoch=False)
        self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False)
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    def _on_nonfinite_step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor | None) -> None:
        """``stop``: raise before the update. ``skip_step``: drop the gradients, so the optimizer skips the update."""
        step, lr = self.trainer.global_step, optimizer.param_groups[0]["lr"]
        what = (f"loss {float(loss) if loss is not None else float('nan'):.4g}, "
                f"gradient norm {float(self._grad_norm):.4g}")
        fix = (f"Likely fix: lower stage.optimizer.lr (now {lr:.3g}) or the warmup's peak, keep gradient clipping "
               "on (trainer.gradient_clip_val), and check the data and trainer.precision")
        if self.on_nonfinite == "stop":
            raise NonFiniteError(f"non-finite training step at step {step} ({what}): the run stops here, before "
                                 f"the update, so every checkpoint holds finite weights. {fix}; or set "
                                 "stage.on_nonfinite=skip_step to skip such steps.")
        self.skipped_steps += 1
        self._consecutive_skips += 1
        for param in self.parameters():
            param.grad = None  # the optimizer leaves parameters without gradients untouched
        logs.warning(logger, f"skipped the update of step {step} ({what}); {self.skipped_steps} skipped in all, "
                             f"{self._consecutive_skips} in a row")
        if self._consecutive_skips >= self.max_consecutive_skips:
            raise NonFiniteError(f"{self._consecutive_skips} non-finite steps in a row up to step {step} ({what}), "
                                 f"stage.max_consecutive_skips={self.max_consecutive_skips}: the run stops. {fix}.")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip the global gradient norm to ``trainer.gradient_clip_val`` (works for sharded gradients)."""
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(f"trainer.gradient_clip_algorithm={gradient_clip_algorithm!r}: herd clips by norm")
        norm = float(self._grad_norm if self._grad_norm is not None else grad_norm(self.parameters()))
        self._grad_norm = None  # measured once per step, in on_before_optimizer_step
        if norm > gradient_clip_val:
            scale_grads(self.parameters(), gradient_clip_val / (norm + 1e-6))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to save non-finite weights; store herd's counters and the model config."""
        finite = all_finite(self.parameters())
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise NonFiniteError(f"the weights hold non-finite values at step {self.trainer.global_step}: no checkpoint "
                                 "is written from them. Lower stage.optimizer.lr, keep gradient clipping on, or set "
                                 "stage.on_nonfinite=skip_step.")
        checkpoint["herd"] = {"tokens_seen": self.tokens_seen, "model_config": self.model_config.to_dict(),
                              "skipped_steps": self.skipped_steps, "start_metrics": dict(self.start_metrics)}
        if self.run_record is not None:
            checkpoint["herd"]["run"] = self.run_record

    def data_bound_state(self, herd: dict[str, Any]) -> str | None:
        """What a checkpoint's ``herd`` entry holds that is only valid on the exact data it was trained on
        (None: nothing); a resume on other data is then refused whatever ``resume_with_changes`` says."""
        return None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        herd = checkpoint.get("herd", {})
        self.tokens_seen = int(herd.get("tokens_seen", 0))
        self.skipped_steps = int(herd.get("skipped_steps", 0))
        self.start_metrics = {k: float(v) for k, v in herd.get("start_metrics", {}).items()}


def all_finite(tensors) -> bool:
    """True when no element of ``tensors`` (local shards, for DTensors) is NaN or infinite."""
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        if local.numel() and not bool(torch.isfinite(local).all()):
            return False
    return True


def parameter_groups(modules: nn.Module | list[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices; never decay norms (1-D weights). Tied or shared weights appear once; frozen
    ones (``requires_grad=False``) not at all."""
    decay, no_decay, seen = [], [], set()
    for module in [modules] if isinstance(modules, nn.Module) else modules:
        for param in module.parameters():  # parameters() yields a tied weight once
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------- adapter stages
# What the adapter stages (vision, speech) share: a frozen backbone, a trained adapter, checks that prove it.
#
# The model of such a stage has a ``backbone`` (a :class:`~herd.model.Transformer`) and an
# ``adapter_modules()`` method. The backbone is frozen:
# - its parameters do not require gradients (the stage builds it so);
# - the optimizer is built over the adapter only, and :meth:`AdapterStage.configure_optimizers`
#   refuses to run if it holds any backbone parameter;
# - a fingerprint of its weights taken before training must match at the end of training (the
#   run stops with :class:`FrozenBackboneError` otherwise).


class FrozenBackboneError(RuntimeError):
    """The backbone's weights changed, or the optimizer holds them: the frozen-LM contract is broken."""


class AdapterStage(BackboneStage):
    """A :class:`BackboneStage` whose backbone stays frozen while ``model.adapter_modules()`` train.

    A subclass gives :meth:`target_hidden` (the final hidden states at the trained positions and
    their targets); the next-token loss (the backbone's output layer on those positions only, in
    chunks: :func:`herd.model.loss.target_logps`), its logging and the validation loss and accuracy
    are shared.
    ``skipped_key`` names the DataModule's count of examples whose media failed to decode.
    """

    skipped_key: str | None = None
    continues_model = True

    def __init__(self, *args, init_from: str | None = None, **kwargs) -> None:
        super().__init__(*args, init_from=init_from, **kwargs)
        self._backbone_fingerprint: list[int] | None = None
        self._tokenizer_object = None
        self.val_loss, self.val_accuracy = MeanMetric(), MeanMetric()

    # Set by a subclass: the stage's name in messages, and how to recognise, load, build and shard its model.
    stage_name = "adapter"

    def is_adapter_directory(self, path: str) -> bool:
        """Whether ``path`` holds a whole model of this stage (backbone and adapter), whose adapter continues."""
        return False

    def load_adapter_directory(self, path: str) -> nn.Module:
        """The whole model from such a directory."""
        raise NotImplementedError

    def wrap_backbone(self, backbone: Transformer) -> nn.Module:
        """A new adapter model around ``backbone``."""
        raise NotImplementedError

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """The modules FSDP2 shards one by one (blocks of the backbone and of the adapter)."""
        raise NotImplementedError

    def configure_model(self) -> None:
        """Build (or load) the model once, freeze its backbone, then parallelise it from outside."""
        if self.model is not None:
            return
        self.model = self.build_adapter_model()
        self.model_config = self.model.config

    def build_adapter_model(self) -> nn.Module:
        """The model from ``init_from`` (a Llama directory, or this stage's own export) or the configs;
        backbone frozen.

        Activation checkpointing and compile apply to the backbone's blocks. Under FSDP2 each of
        :meth:`shard_units` is sharded, then the whole model (tensor parallelism is not supported
        by the adapter stages).
        """
        mesh = self._device_mesh
        self._check_context_parallel(mesh)
        if mesh is not None and mesh["tensor_parallel"].size() > 1:
            raise ValueError(f"stage={self.stage_name} does not support tensor parallelism: use strategy=fsdp2 or ddp")
        meta = mesh is not None and self.init_from is None and self._wants_meta_init()
        if self.init_from is not None and self.is_adapter_directory(self.init_from):
            model = self.load_adapter_directory(self.init_from)
        else:
            with torch.device("meta") if meta else nullcontext():
                backbone = (hf.load(self.init_from, dtype=torch.float32, config=self.model_config)
                            if self.init_from is not None else Transformer(self.model_config))
                model = self.wrap_backbone(backbone)
        model.backbone.requires_grad_(False)
        apply_activation_checkpointing(model.backbone, self.activation_checkpointing)
        if self.compile_blocks:
            compile_blocks(model.backbone)
        if mesh is not None:
            shard_adapter_model(model, self.shard_units(model), fsdp_mesh(mesh), **self.fsdp_options)
        if meta:
            model.to_empty(device=self.trainer.strategy.root_device)
            model.init_weights()
        return model

    def trained_modules(self) -> list[nn.Module]:
        """The adapter's modules (``model.adapter_modules()``)."""
        return self.model.adapter_modules()

    def configure_optimizers(self) -> dict[str, Any]:
        """The base optimizer over the adapter; refused if it would hold a backbone parameter."""
        config = super().configure_optimizers()
        backbone = {id(p) for p in self.model.backbone.parameters()}
        held = [p for group in config["optimizer"].param_groups for p in group["params"] if id(p) in backbone]
        if held:
            raise FrozenBackboneError(f"the optimizer holds {len(held)} backbone parameter(s); the backbone of "
                                      f"{type(self).__name__} must stay frozen")
        return config

    def on_fit_start(self) -> None:
        """Fingerprint the frozen backbone's weights."""
        self._backbone_fingerprint = fingerprint(self.model.backbone)

    def on_train_end(self) -> None:
        """Check that the backbone's weights are bit for bit those training started from."""
        if self._backbone_fingerprint is not None and fingerprint(self.model.backbone) != self._backbone_fingerprint:
            raise FrozenBackboneError("the frozen backbone's weights changed during training; an adapter must leave "
                                      "the language model untouched")

    def target_hidden(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Final normed hidden states (trained positions, dim) and their targets (trained positions,)."""
        raise NotImplementedError

    def target_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy at the trained positions, and how many there are."""
        hidden, targets = self.target_hidden(batch)
        total = -target_logps(hidden, self.model.backbone.output.weight, targets).sum()
        return total, targets.new_tensor(targets.numel())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Next-token cross-entropy at the trained positions, token-weighted over the accumulation
        window; logs it, the tokens seen and the skipped media."""
        total, n_tokens = self.target_loss(batch)
        loss = self.window_loss({"tokens": total}, batch)
        self.count_tokens(batch["tokens"])
        sync = self.trainer.world_size > 1
        self.log("train/loss", total.detach() / n_tokens.clamp(min=1), on_step=True, on_epoch=False, prog_bar=True,
                 sync_dist=sync)
        self.log("train/tokens_seen", float(self.tokens_seen), on_step=True, on_epoch=False)
        skipped = getattr(self.trainer.datamodule, self.skipped_key, None) if self.skipped_key else None
        if skipped is not None:
            self.log(f"train/{self.skipped_key}", float(skipped), on_step=True, on_epoch=False)
        return loss

    def update_val_loss(self, batch: dict[str, torch.Tensor]) -> None:
        """Add the batch to ``val/loss`` and ``val/accuracy`` (token-weighted over the trained positions)."""
        hidden, targets = self.target_hidden(batch)
        total, n, correct = target_scores(hidden, self.model.backbone.output.weight, targets)
        if n:
            self.val_loss.update(total / n, weight=int(n))
            self.val_accuracy.update(correct / n, weight=int(n))

    def tokenizer(self):
        """The data's tokenizer (:class:`herd.data.tokenizer.Tokenizer`), loaded once."""
        if self._tokenizer_object is None:
            from herd.data.tokenizer import Tokenizer

            self._tokenizer_object = Tokenizer.load(self.trainer.datamodule.tokenizer)
        return self._tokenizer_object

    def log_epoch_metrics(self, metrics: Mapping[str, Metric], prog_bar: str = "val/loss") -> None:
        """Log and reset each metric that was updated this epoch (every rank's updates are synced by torchmetrics)."""
        for name, metric in metrics.items():
            if metric.update_count > 0:
                self.log(name, metric.compute(), prog_bar=name == prog_bar, sync_dist=False)
            metric.reset()

    def export_state(self) -> dict[str, torch.Tensor]:
        """The whole model's weights (herd names); a collective when sharded."""
        return full_state_dict(self.model)


def fingerprint(module: nn.Module) -> list[int]:
    """Per parameter, the sum of its elements' bit patterns (local shards for DTensors): any change of
    the weights changes it, short of changes that cancel exactly."""
    out = []
    for param in module.parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[local.element_size()]
        out.append(int(local.detach().contiguous().view(bits).long().sum()))
    return out
