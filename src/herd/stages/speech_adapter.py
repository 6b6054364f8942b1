"""stage=speech_adapter: the speech encoder and adapter on a frozen backbone, trained on transcripts (paper 8.2-8.3).

The model is a :class:`~herd.model.speech.SpeechLanguageModel`: the backbone of ``init_from`` (a
Llama directory), a Conformer encoder and an adapter whose outputs the backbone reads as token
embeddings between ``<|speech_start|>`` and ``<|speech_end|>``. When ``init_from`` is a speech
model directory (this stage's export), its encoder and adapter continue training. The backbone
is frozen, with the checks of :class:`~herd.stages.base.AdapterStage` (no gradients, not in
the optimizer, bit-identical weights after training).

The loss is next-token cross-entropy on the transcript only (``targets`` from the speech
DataModule): the user turn, the speech positions and the headers are masked. Validation logs:
- ``val/loss`` and ``val/accuracy``: token-weighted over the transcript tokens (and the closing
  ``<|eot_id|>``);
- ``val/wer``: the word error rate of greedy transcripts of held-out clips against their
  references (``torchmetrics``' ``WordErrorRate``: word edits over reference words);
- the first ``samples`` clips as TensorBoard audio under ``speech/<i>``, with their greedy and
  reference transcripts as text.

``withhold_audio=true`` trains and validates the same encoder and adapter on the same
transcripts with the features of every clip replaced by zeros (no audio): the text-only baseline. The
best it can learn is the transcripts' prior, so a model whose ``val/loss`` falls clearly below it
is listening.

The export is the language model as a Llama directory with the adapter beside it
(:func:`herd.interop.speech.save_speech`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torchmetrics.text import WordErrorRate

from herd.constants import IGNORE_INDEX
from herd.interop import speech as speech_io
from herd.model import Transformer
from herd.model.speech import SpeechConfig, SpeechLanguageModel
from herd.stages.base import AdapterStage


class SpeechAdapterStage(AdapterStage):
    """Trains the speech encoder and adapter of a :class:`SpeechLanguageModel`; see the module docstring.

    ``speech`` holds :class:`SpeechConfig` fields (a ``configs/speech`` preset); it is not used when
    ``init_from`` is a speech model directory, which has its own. ``max_transcript_tokens`` bounds
    the greedy transcripts of validation; ``transcribe_examples`` is how many val clips per
    validation are transcribed (null: all); ``samples`` how many clips and transcripts are logged.
    """

    skipped_key = "skipped_audio"
    summary_metrics = ("val/loss", "val/accuracy", "val/wer")

    def __init__(
        self,
        *args,
        speech: dict[str, Any] | None = None,
        init_from: str | None = None,
        withhold_audio: bool = False,
        max_transcript_tokens: int = 32,
        transcribe_examples: int | None = None,
        samples: int = 4,
        **kwargs,
    ) -> None:
        super().__init__(*args, init_from=init_from, **kwargs)
        if init_from is not None and speech_io.is_speech_model(init_from):
            self.speech_config = speech_io.read_speech_config(init_from)
        else:
            self.speech_config = SpeechConfig.from_dict(speech or {})
        self.withhold_audio = withhold_audio
        if not isinstance(max_transcript_tokens, int) or max_transcript_tokens < 1:
            raise ValueError(f"stage.max_transcript_tokens must be a positive integer, got {max_transcript_tokens!r}")
        self.max_transcript_tokens = max_transcript_tokens
        self.transcribe_examples = transcribe_examples
        self.samples = samples
        self.val_wer = WordErrorRate()
        self._transcribed = 0
        self._sample_rows: list[tuple[torch.Tensor, str, str]] = []

    # ----------------------------------------------------------------------------------- model

    stage_name = "speech_adapter"
    starts_from = ("the language model under the adapter, e.g. the export of a pretraining or SFT run "
                   "(logs/pretrain/runs/<run>/export), or a speech model directory whose encoder and adapter continue")

    def is_adapter_directory(self, path: str) -> bool:
        """A speech model directory (this stage's export): its encoder and adapter continue."""
        return speech_io.is_speech_model(path)

    def load_adapter_directory(self, path: str) -> SpeechLanguageModel:
        return speech_io.load_speech(path, dtype=torch.float32, config=self.model_config)

    def wrap_backbone(self, backbone: Transformer) -> SpeechLanguageModel:
        return SpeechLanguageModel(backbone, self.speech_config)

    def shard_units(self, model: SpeechLanguageModel) -> list[nn.Module]:
        """Every backbone block, every Conformer block and the adapter's transformer layer."""
        return [*model.backbone.layers, *model.encoder.layers, model.adapter.layer]

    def setup(self, stage: str) -> None:
        """Give the DataModule the model's frame arithmetic, and check that its speech tokens fit the model."""
        super().setup(stage)
        datamodule = self.trainer.datamodule if self.trainer is not None else None
        if datamodule is None:
            return
        if not hasattr(datamodule, "set_speech_frames"):
            raise ValueError("stage=speech_adapter trains on speech-transcript data: use data=speech (prepared with "
                             "kind: audio, e.g. make prepare-speech)")
        datamodule.set_speech_frames(self.speech_config.output_frames)
        for name in ("speech_start_id", "speech_end_id"):
            token = int(getattr(datamodule, name))
            if token >= self.model_config.vocab_size:
                raise ValueError(f"the data's {name} is {token}, past the model's vocab_size "
                                 f"{self.model_config.vocab_size}: prepare the data with the model's tokenizer")

    # ------------------------------------------------------------------------------------ loss

    def audio_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's log-mel features (all zeros with ``withhold_audio``: nothing to hear)."""
        features = batch["features"]
        return torch.zeros_like(features) if self.withhold_audio else features

    def target_hidden(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """See :meth:`transcript_hidden`."""
        return self.transcript_hidden(batch)

    def transcript_hidden(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states (transcript tokens, dim) and their targets: the loss runs the head on
        transcript positions only."""
        targets = batch["targets"]
        hidden = self.model(batch["tokens"], self.audio_features(batch), batch["feature_lengths"],
                            batch["speech_mask"], output_hidden=True)  # (batch, seq, dim)
        selected = targets != IGNORE_INDEX
        return hidden[selected], targets[selected]

    def on_validation_epoch_start(self) -> None:
        self._transcribed = 0
        self._sample_rows = []

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.update_val_loss(batch)
        if self.transcribe_examples is None or self._transcribed < self.transcribe_examples:
            self._transcribe(batch)

    def _transcribe(self, batch: dict[str, torch.Tensor]) -> None:
        """Greedy transcripts of the batch's clips, scored by word error rate; keeps samples to log."""
        tokens, targets, speech_mask = batch["tokens"], batch["targets"], batch["speech_mask"]
        has_transcript = (targets != IGNORE_INDEX).any(dim=1)
        rows = [row for row in range(len(tokens)) if bool(has_transcript[row])]  # a clip that failed to decode has none
        if not rows:
            return
        first = (targets != IGNORE_INDEX).int().argmax(dim=1)  # the last prompt position: it predicts the first word
        prompts = [tokens[row, : int(first[row]) + 1] for row in rows]
        masks = [speech_mask[row, : int(first[row]) + 1] for row in rows]
        index = torch.tensor(rows, device=tokens.device)
        datamodule = self.trainer.datamodule
        stop_ids = [int(datamodule.eot_id), int(datamodule.pad_id)]
        generated = self.model.generate(prompts, masks, self.audio_features(batch).index_select(0, index),
                                        batch["feature_lengths"].index_select(0, index), self.max_transcript_tokens,
                                        stop_ids=stop_ids)
        tokenizer = self.tokenizer()
        predictions, references = [], []
        for row, ids in zip(rows, generated, strict=True):
            reference = [t for t in targets[row][targets[row] != IGNORE_INDEX].tolist() if t not in stop_ids]
            predictions.append(tokenizer.decode(ids).strip())
            references.append(tokenizer.decode(reference).strip())
            if len(self._sample_rows) < self.samples:
                length = int(batch["waveform_lengths"][row])
                self._sample_rows.append((batch["waveform"][row, :length].float().cpu(), predictions[-1],
                                          references[-1]))
        self.val_wer.update(predictions, references)
        self._transcribed += len(rows)

    def on_validation_epoch_end(self) -> None:
        self.log_epoch_metrics({"val/loss": self.val_loss, "val/accuracy": self.val_accuracy, "val/wer": self.val_wer})
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self._log_samples()

    def _log_samples(self) -> None:
        step = self.trainer.global_step
        rate = int(self.trainer.datamodule.sample_rate)
        for run_logger in self.trainer.loggers:
            if not isinstance(run_logger, TensorBoardLogger):
                continue
            table = ["| clip | greedy transcript | reference |", "|---|---|---|"]
            for index, (waveform, got, want) in enumerate(self._sample_rows):
                run_logger.experiment.add_audio(f"speech/{index}", waveform[None], global_step=step, sample_rate=rate)
                run_logger.experiment.add_text(f"speech/{index}", f"**greedy:** {got}\n\n**reference:** {want}",
                                               global_step=step)
                table.append(f"| speech/{index} | {got} | {want} |")
            if self._sample_rows:
                run_logger.experiment.add_text("transcripts", "\n".join(table), global_step=step)

    # ---------------------------------------------------------------------------------- export

    def save_export(self, path: Path, state: dict[str, torch.Tensor], tokenizer: Any = None) -> Path:
        """The language model's Llama directory with the speech adapter beside it."""
        return speech_io.save_speech(self.model, path, tokenizer=tokenizer, state_dict=state)
