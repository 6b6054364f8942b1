"""SpeechDataModule: prepared audio-transcript shards (``herd.data.kinds.audio``) as batches for stage=speech_adapter.

Each clip becomes 80-bin log-mel features with ``transformers``' ``WhisperFeatureExtractor``
(built here, no download), computed on the clip alone with no padding to 30 s: a clip of N
samples at 16 kHz gives N // 160 frames (10 ms each). The speech encoder turns T frames into
``frames_fn(T)`` embeddings; that arithmetic is the model's, so the stage sets it
(:meth:`SpeechDataModule.set_speech_frames`) before any dataloader is made.

Batches are dicts of tensors; row i holds example i and clip i:

- ``tokens`` (batch, seq) int64: the example's dialog (``herd.data.kinds.audio``) with ``n_i =
  frames_fn(feature_lengths[i])`` filler positions (``<|end_of_text|>``) inserted between
  ``<|speech_start|>`` and ``<|speech_end|>``, right-padded with ``<|end_of_text|>`` to the longest row;
- ``speech_mask`` (batch, seq) bool: true exactly on the n_i filler positions of each row, where
  the stage puts the clip's embeddings;
- ``targets`` (batch, seq) int64: ``tokens[t + 1]`` where that is a transcript token or the
  closing ``<|eot_id|>``, else -100, so the loss covers the transcript only;
- ``features`` (batch, 80, frames) float32: log-mel, zero-padded on the right to the longest clip;
  ``feature_lengths`` (batch,) int64: each clip's own frames;
- ``waveform`` (batch, samples) float32 in [-1, 1] at 16 kHz, zero-padded; ``waveform_lengths``
  (batch,) int64.

Sources, the train and val streams, and skips are those of every media kind
(:mod:`herd.data.loaders.media`). A clip that fails to decode is skipped, naming its key in a
warning, and counted in :attr:`SpeechDataModule.skipped_audio`. In training it is left out. In
validation it stays as :data:`BLANK_SECONDS` of silence whose targets are all -100.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from herd.data.kinds.audio import SAMPLE_RATE, decode_audio
from herd.data.kinds.media import ExampleRow
from herd.data.loaders.media import MediaDataModule, token_rows

SKIPPED_KEY = "skipped_audio"  # per-batch count of clips a reader skipped since its previous batch
MEL_BINS = 80
HOP_LENGTH = 160  # samples per log-mel frame: 10 ms at 16 kHz
BLANK_SECONDS = 0.5

# Encoder frames of T log-mel frames (the model's arithmetic; set by the stage).
FramesFn = Callable[[int], int]


def mel_extractor():
    """``transformers``' ``WhisperFeatureExtractor`` for 80-bin log-mel at 16 kHz, built locally."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=MEL_BINS, sampling_rate=SAMPLE_RATE, hop_length=HOP_LENGTH)


def log_mel(extractor, waveform: np.ndarray) -> np.ndarray:
    """(80, frames) float32 log-mel of one 16 kHz clip, not padded: ``len(waveform) // 160`` frames."""
    out = extractor(waveform, sampling_rate=SAMPLE_RATE, padding="longest", return_tensors="np")
    return np.ascontiguousarray(out["input_features"][0], dtype=np.float32)


class SpeechDataModule(MediaDataModule):
    """Audio-transcript sources of prepared folders; see the module docstring and :class:`MediaDataModule`."""

    kind = "audio"
    skipped_key = SKIPPED_KEY
    noun = "an audio clip"
    prepare_hint = "make prepare-speech"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.speech_start_id = self.source_id("speech_start_id", "<|speech_start|>")
        self.speech_end_id = self.source_id("speech_end_id", "<|speech_end|>")
        self.frames_fn: FramesFn | None = None

    @property
    def sample_rate(self) -> int:
        """Samples per second of every waveform (16,000)."""
        return SAMPLE_RATE

    @property
    def eot_id(self) -> int:
        """``<|eot_id|>``, which ends the transcript."""
        return int(self.manifest.data["tokenizer"]["special_ids"]["eot_id"])

    @property
    def skipped_audio(self) -> int:
        """Clips that failed to decode so far."""
        return self.skipped_media

    def set_speech_frames(self, frames_fn: FramesFn) -> None:
        """The encoder's embeddings per log-mel frame count; needed before any dataloader is made."""
        self.frames_fn = frames_fn

    def featurizer(self) -> SpeechFeaturizer:
        """Decoding, log-mel and the speech positions with the stage's ``frames_fn``."""
        if self.frames_fn is None:
            raise RuntimeError("the speech DataModule does not know how many embeddings a clip takes: train it with "
                               "stage=speech_adapter, which sets the model's (SpeechDataModule.set_speech_frames)")
        return SpeechFeaturizer(self.frames_fn, self.speech_start_id, self.speech_end_id, self.pad_id)

    def collate(self) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        """:class:`SpeechCollate` with ``<|end_of_text|>`` padding."""
        return SpeechCollate(self.pad_id)


class SpeechFeaturizer:
    """A stored example -> its ids with the speech positions, masks, log-mel features and waveform."""

    def __init__(self, frames_fn: FramesFn, start_id: int, end_id: int, fill_id: int) -> None:
        self.frames_fn, self.start_id, self.end_id, self.fill_id = frames_fn, start_id, end_id, fill_id
        self.extractor = mel_extractor()

    def __call__(self, row: ExampleRow, key: str) -> dict[str, Any]:
        """The example with its clip; BadInputError when the clip does not decode."""
        return self._example(row, decode_audio(row.media, key))

    def blank(self, row: ExampleRow) -> dict[str, Any]:
        """The example with :data:`BLANK_SECONDS` of silence."""
        return self._example(row, np.zeros(int(BLANK_SECONDS * SAMPLE_RATE), np.float32))

    def _example(self, row: ExampleRow, waveform: np.ndarray) -> dict[str, Any]:
        features = log_mel(self.extractor, waveform)  # (80, frames)
        count = int(self.frames_fn(features.shape[1]))
        tokens = row.tokens.astype(np.int64)
        starts = np.flatnonzero(tokens == self.start_id)
        if len(starts) != 1 or starts[0] + 1 >= len(tokens) or tokens[starts[0] + 1] != self.end_id:
            raise ValueError(f"example {row.description.get('id', row.index)}: expected one <|speech_start|> "
                             "followed by <|speech_end|>; the shards are not herd.data.kinds.audio's")
        cut = int(starts[0]) + 1
        filler = np.full(count, self.fill_id, np.int64)
        return {
            "tokens": np.concatenate([tokens[:cut], filler, tokens[cut:]]),
            "loss_mask": np.concatenate([row.loss_mask[:cut], np.zeros(count, bool), row.loss_mask[cut:]]),
            "speech_mask": np.concatenate([np.zeros(cut, bool), np.ones(count, bool),
                                           np.zeros(len(tokens) - cut, bool)]),
            "features": features,
            "waveform": waveform,
        }


class SpeechCollate:
    """Examples -> a batch (see the module docstring); ``pad_id`` pads the token rows."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        tokens, targets = token_rows(examples, self.pad_id)
        speech_mask = torch.zeros(tokens.shape, dtype=torch.bool)
        frames = [e["features"].shape[1] for e in examples]
        samples = [len(e["waveform"]) for e in examples]
        features = torch.zeros(len(examples), MEL_BINS, max(frames))
        waveform = torch.zeros(len(examples), max(samples))
        for i, example in enumerate(examples):
            speech_mask[i, : len(example["speech_mask"])] = torch.from_numpy(example["speech_mask"])
            features[i, :, : frames[i]] = torch.from_numpy(example["features"])
            waveform[i, : samples[i]] = torch.from_numpy(example["waveform"])
        return {
            "tokens": tokens,
            "speech_mask": speech_mask,
            "targets": targets,
            "features": features,
            "feature_lengths": torch.tensor(frames, dtype=torch.long),
            "waveform": waveform,
            "waveform_lengths": torch.tensor(samples, dtype=torch.long),
            SKIPPED_KEY: torch.tensor([e[SKIPPED_KEY] for e in examples], dtype=torch.long),
        }
