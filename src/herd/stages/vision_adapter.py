"""stage=vision_adapter: the vision adapter on a frozen backbone, trained on captions (paper 7.3; Llama 3.2 Vision).

The model is a :class:`~herd.model.vision.VisionLanguageModel`. Its backbone is the language
model of ``init_from`` (a Llama directory), or the whole of it when ``init_from`` is a Llama 3.2
Vision (``MllamaForConditionalGeneration``) directory, whose adapter then continues training.
The backbone is frozen:
- its parameters do not require gradients;
- the optimizer is built over the adapter only, and :meth:`configure_optimizers` refuses to
  run if it holds any backbone parameter;
- a fingerprint of its weights taken before training must match at the end of training (the
  run stops with an error otherwise).
The encoder, the projection, the cross-attention blocks and the new-token embeddings train.

The loss is next-token cross-entropy on the caption only (``targets`` from
:mod:`herd.data.loaders.image`): the prompt, ``<|image|>`` and ``<|begin_of_text|>`` are masked.
Validation logs:
- ``val/loss`` and ``val/accuracy``: token-weighted over the caption tokens;
- ``val/caption_exact``: the share of greedy captions that equal the reference;
- ``val/caption_word_accuracy``: the share of reference words the greedy caption has at the
  same place (for ``stdlib:shapes`` that is the mean accuracy over count, colour and shape).
The first ``samples`` validation images are logged to TensorBoard under ``captions/<i>`` (the
images tab), with their greedy and reference captions as text.

``withhold_images=true`` trains and validates the same adapter on the same captions, with every
image replaced by a blank one. That is the text-only baseline: the best it can learn is the
captions' prior, so a model whose ``val/loss`` falls clearly below it is using the images.

The export is an ``MllamaForConditionalGeneration`` directory (:func:`herd.interop.mllama.save_vision`).
The tokenizer copy gets ``<|image|>``, and ``transformers`` loads the directory as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torchmetrics import MeanMetric

from herd import logs
from herd.constants import IGNORE_INDEX
from herd.interop import mllama
from herd.model import Transformer
from herd.model.vision import ImageBatch, VisionConfig, VisionLanguageModel
from herd.stages.base import AdapterStage, FrozenBackboneError, fingerprint

__all__ = ["FrozenBackboneError", "VisionAdapterStage", "fingerprint"]

logger = logs.get_logger(__name__)


class VisionAdapterStage(AdapterStage):
    """Trains the vision adapter of a :class:`VisionLanguageModel` on captions; see the module docstring.

    ``vision`` holds :class:`VisionConfig` fields (a ``configs/vision`` preset); it is not used when
    ``init_from`` is an Mllama directory, which has its own. ``max_caption_tokens`` bounds the greedy
    captions of validation; ``caption_examples`` is how many val examples per validation get one
    (null: all); ``samples`` how many images and captions are logged. ``gate_lr_scale`` multiplies
    the learning rate of the cross-attention gates: a gate starts at zero and scales everything its
    block adds, so a small model trained for a few hundred steps learns faster when its gates open
    sooner.
    """

    skipped_key = "skipped_images"
    summary_metrics = ("val/loss", "val/accuracy", "val/caption_exact", "val/caption_word_accuracy")

    def __init__(
        self,
        *args,
        vision: dict[str, Any] | None = None,
        init_from: str | None = None,
        withhold_images: bool = False,
        max_caption_tokens: int = 16,
        caption_examples: int | None = None,
        samples: int = 4,
        gate_lr_scale: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(*args, init_from=init_from, **kwargs)
        if init_from is not None and mllama.is_vision_model(init_from):
            self.vision_config = mllama.read_preprocessor(init_from, mllama.read_configs(init_from)[1])
        else:
            self.vision_config = VisionConfig.from_dict(vision or {})
        self.withhold_images = withhold_images
        self.max_caption_tokens = max_caption_tokens
        self.caption_examples = caption_examples
        self.samples = samples
        if not isinstance(gate_lr_scale, (int, float)) or gate_lr_scale <= 0:
            raise ValueError(f"stage.gate_lr_scale must be a number > 0, got {gate_lr_scale!r}")
        self.gate_lr_scale = float(gate_lr_scale)
        self.val_exact, self.val_words = MeanMetric(), MeanMetric()
        self._captioned = 0
        self._sample_rows: list[tuple[torch.Tensor, str, str]] = []

    # ----------------------------------------------------------------------------------- model

    stage_name = "vision_adapter"
    starts_from = ("the language model under the adapter, e.g. the export of a pretraining run "
                   "(logs/pretrain/runs/<run>/export), or a Llama 3.2 Vision (Mllama) directory whose adapter continues")

    def is_adapter_directory(self, path: str) -> bool:
        """A Llama 3.2 Vision (Mllama) directory: its adapter continues."""
        return mllama.is_vision_model(path)

    def load_adapter_directory(self, path: str) -> VisionLanguageModel:
        return mllama.load_vision(path, dtype=torch.float32, config=self.model_config)

    def wrap_backbone(self, backbone: Transformer) -> VisionLanguageModel:
        return VisionLanguageModel(backbone, self.vision_config)

    def shard_units(self, model: VisionLanguageModel) -> list[nn.Module]:
        """Every backbone block, cross-attention block and encoder layer."""
        return [*model.backbone.layers, *model.cross_layers, *model.encoder.transformer.layers,
                *model.encoder.global_transformer.layers]

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """The base groups over the adapter, with the cross-attention gates in a group of their own
        whose learning rate is ``gate_lr_scale`` times the others' (no weight decay)."""
        gates = [p for name, p in self.model.cross_layers.named_parameters() if name.endswith("_gate")]
        if self.gate_lr_scale == 1.0:
            return super().optimizer_groups()
        gate_ids = {id(p) for p in gates}
        groups = [dict(group, params=[p for p in group["params"] if id(p) not in gate_ids])
                  for group in super().optimizer_groups()]
        lr = float(getattr(self.optimizer_factory, "keywords", {}).get("lr", 3e-4))
        return [*groups, {"params": gates, "weight_decay": 0.0, "lr": lr * self.gate_lr_scale}]

    def setup(self, stage: str) -> None:
        """Give the DataModule the model's tiling, and check that it reads image data with our <|image|> id."""
        super().setup(stage)
        datamodule = self.trainer.datamodule if self.trainer is not None else None
        if datamodule is None:
            return
        if not hasattr(datamodule, "set_tiler"):
            raise ValueError("stage=vision_adapter trains on image-caption data: use data=images (prepared with "
                             "kind: image, e.g. make prepare-vision)")
        from herd.data.kinds.image import ImageTiler

        datamodule.set_tiler(ImageTiler.for_model(self.vision_config))
        if datamodule.image_token_id != self.model_config.vocab_size:
            raise ValueError(f"the data's <|image|> id is {datamodule.image_token_id} but the model's is its vocab_size "
                             f"{self.model_config.vocab_size}: prepare the data with the model's tokenizer")

    # ------------------------------------------------------------------------------------ loss

    def images(self, batch: dict[str, torch.Tensor]) -> ImageBatch:
        """The batch's images (blank ones with ``withhold_images``)."""
        pixels = batch["pixel_values"]
        if self.withhold_images:
            pixels = torch.zeros_like(pixels)
        return ImageBatch(pixels, batch["aspect_ratio_ids"], batch["num_tiles"], batch["image_rows"])

    def target_hidden(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """See :meth:`caption_hidden`."""
        return self.caption_hidden(batch)

    def caption_hidden(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states (caption tokens, dim) and their targets: the loss runs the head on caption
        positions only."""
        targets = batch["targets"]
        hidden = self.model(batch["tokens"], self.images(batch), output_hidden=True)  # (batch, seq, dim)
        selected = targets != IGNORE_INDEX
        return hidden[selected], targets[selected]

    def on_validation_epoch_start(self) -> None:
        self._captioned = 0
        self._sample_rows = []

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.update_val_loss(batch)
        if self.caption_examples is None or self._captioned < self.caption_examples:
            self._caption(batch)

    def _caption(self, batch: dict[str, torch.Tensor]) -> None:
        """Greedy captions of the batch's images, scored against the references; keeps samples to log."""
        tokens, targets = batch["tokens"], batch["targets"]
        has_caption = (targets != IGNORE_INDEX).any(dim=1)
        first = torch.where(has_caption, (targets != IGNORE_INDEX).int().argmax(dim=1), 0)
        prompts = [tokens[row, : int(first[row]) + 1].tolist() for row in range(len(tokens))]
        eos = int(self.trainer.datamodule.pad_id)
        generated = self.model.generate(prompts, self.images(batch), self.max_caption_tokens, stop_ids=[eos])
        tokenizer = self.tokenizer()
        for row, ids in enumerate(generated):
            if not bool(has_caption[row]):
                continue  # an example whose image did not decode
            reference = [t for t in targets[row][targets[row] != IGNORE_INDEX].tolist() if t != eos]
            got_words, want_words = tokenizer.decode(ids).split(), tokenizer.decode(reference).split()
            self.val_exact.update(float(ids == reference))
            hits = sum(a == b for a, b in zip(got_words, want_words, strict=False))
            self.val_words.update(hits / max(len(want_words), 1), weight=max(len(want_words), 1))
            self._captioned += 1
            if len(self._sample_rows) < self.samples:
                self._sample_rows.append((self._picture(batch, row), tokenizer.decode(ids),
                                          tokenizer.decode(reference)))

    def _picture(self, batch: dict[str, torch.Tensor], row: int) -> torch.Tensor:
        """The row's image rebuilt from its tiles, (3, H, W) in [0, 1]."""
        tiles = batch["pixel_values"][row, : int(batch["num_tiles"][row])].float().cpu()
        grid_rows, grid_cols = self.vision_config.aspect_ratios[int(batch["aspect_ratio_ids"][row]) - 1]
        size = tiles.shape[-1]
        picture = tiles.view(grid_rows, grid_cols, 3, size, size).permute(2, 0, 3, 1, 4)
        picture = picture.reshape(3, grid_rows * size, grid_cols * size)
        mean = torch.tensor(self.vision_config.image_mean)[:, None, None]
        std = torch.tensor(self.vision_config.image_std)[:, None, None]
        return (picture * std + mean).clamp(0, 1)

    def on_validation_epoch_end(self) -> None:
        metrics = {"val/loss": self.val_loss, "val/accuracy": self.val_accuracy, "val/caption_exact": self.val_exact,
                   "val/caption_word_accuracy": self.val_words}
        self.log_epoch_metrics(metrics)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self._log_samples()

    def _log_samples(self) -> None:
        step = self.trainer.global_step
        for run_logger in self.trainer.loggers:
            if not isinstance(run_logger, TensorBoardLogger):
                continue
            table = ["| image | greedy caption | reference |", "|---|---|---|"]
            for index, (picture, got, want) in enumerate(self._sample_rows):
                run_logger.experiment.add_image(f"captions/{index}", picture, global_step=step)
                run_logger.experiment.add_text(f"captions/{index}", f"**greedy:** {got}\n\n**reference:** {want}",
                                               global_step=step)
                table.append(f"| captions/{index} | {got} | {want} |")
            if self._sample_rows:
                run_logger.experiment.add_text("captions", "\n".join(table), global_step=step)

    # ---------------------------------------------------------------------------------- export

    def save_export(self, path: Path, state: dict[str, torch.Tensor], tokenizer: Any = None) -> Path:
        """An ``MllamaForConditionalGeneration`` directory."""
        return mllama.save_vision(self.model, path, tokenizer=tokenizer, state_dict=state)
