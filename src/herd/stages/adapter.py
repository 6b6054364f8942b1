"""What the adapter stages (vision, speech) share: a frozen backbone, a trained adapter, checks that prove it.

The model of such a stage has a ``backbone`` (a :class:`~herd.model.Transformer`) and an
``adapter_modules()`` method. The backbone is frozen:
- its parameters do not require gradients (the stage builds it so);
- the optimizer is built over the adapter only, and :meth:`AdapterStage.configure_optimizers`
  refuses to run if it holds any backbone parameter;
- a fingerprint of its weights taken before training must match at the end of training (the
  run stops with :class:`FrozenBackboneError` otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torchmetrics import MeanMetric, Metric

from herd import logs
from herd.interop import hf
from herd.model import Transformer
from herd.stages.base import BackboneStage
from herd.stages.parallelize import _dtype, apply_activation_checkpointing, compile_blocks, full_state_dict

logger = logs.get_logger(__name__)


class FrozenBackboneError(RuntimeError):
    """The backbone's weights changed, or the optimizer holds them: the frozen-LM contract is broken."""


class AdapterStage(BackboneStage):
    """A :class:`BackboneStage` whose backbone stays frozen while ``model.adapter_modules()`` train.

    A subclass gives :meth:`target_logits` (the logits at the trained positions and their
    targets); the next-token loss, its logging and the validation loss and accuracy are shared.
    ``skipped_key`` names the DataModule's count of examples whose media failed to decode.
    """

    skipped_key: str | None = None

    def __init__(self, *args, init_from: str | None = None, **kwargs) -> None:
        super().__init__(*args, init_from=init_from, **kwargs)
        if init_from is None:
            logs.warning(logger, f"stage.init_from is not set: {type(self).__name__} trains its adapter on a randomly "
                                 "initialised, frozen backbone, which can learn nothing useful (fine for tests); start "
                                 "from a model directory, e.g. the export of a pretraining run")
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
            shard_adapter_model(model, self.shard_units(model), mesh["data_parallel"], **self.fsdp_options)
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

    def target_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (trained positions, vocab) float32 and their targets."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Next-token cross-entropy at the trained positions; logs it, the tokens seen and the skipped media."""
        logits, targets = self.target_logits(batch)
        loss = F.cross_entropy(logits, targets)
        self.count_tokens(batch["tokens"])
        sync = self.trainer.world_size > 1
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, sync_dist=sync)
        self.log("train/tokens_seen", float(self.tokens_seen), on_step=True, on_epoch=False)
        skipped = getattr(self.trainer.datamodule, self.skipped_key, None) if self.skipped_key else None
        if skipped is not None:
            self.log(f"train/{self.skipped_key}", float(skipped), on_step=True, on_epoch=False)
        return loss

    def update_val_loss(self, batch: dict[str, torch.Tensor]) -> None:
        """Add the batch to ``val/loss`` and ``val/accuracy`` (token-weighted over the trained positions)."""
        logits, targets = self.target_logits(batch)
        n = targets.numel()
        if n:
            loss = F.cross_entropy(logits, targets, reduction="sum")
            self.val_loss.update(loss / n, weight=n)
            self.val_accuracy.update((logits.argmax(-1) == targets).float().mean(), weight=n)

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


def shard_adapter_model(model: nn.Module, units: Sequence[nn.Module], mesh: DeviceMesh, *,
                        param_dtype: str | None = None, reduce_dtype: str | None = "fp32",
                        reshard_after_forward: bool = True) -> None:
    """FSDP2: ``fully_shard`` each of ``units`` (blocks of the backbone and the adapter), then the whole model.

    The root keeps what no unit holds (embeddings, norms, heads, projections). It stays gathered
    after forward, because the adapter stages apply the head outside forward.
    """
    policy = MixedPrecisionPolicy(param_dtype=_dtype(param_dtype, "param_dtype"),
                                  reduce_dtype=_dtype(reduce_dtype, "reduce_dtype"))
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
