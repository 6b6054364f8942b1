"""SpeechDataModule: log-mel features, the speech positions between the two speech tokens, skips."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from helpers.synthetic import damage_first_media
from herd.data.loaders.audio import SpeechDataModule, log_mel, mel_extractor
from herd.data.manifest import ManifestError
from herd.data.tokenizer import Tokenizer


def frames_fn(t: int) -> int:
    """The speech encoder's arithmetic: stack 4 frames, then a stride-2 convolution with padding 1."""
    return (t // 4 + 1) // 2


def datamodule(folder, **options) -> SpeechDataModule:
    dm = SpeechDataModule(str(folder), num_workers=0, shuffle_buffer=1, **options)
    dm.set_speech_frames(frames_fn)
    return dm


def test_log_mel_has_80_bins_and_a_frame_every_10_ms():
    extractor = mel_extractor()
    for samples in (16_000, 16_100, 24_321):
        features = log_mel(extractor, np.random.default_rng(0).uniform(-0.5, 0.5, samples).astype(np.float32))
        assert features.shape == (80, samples // 160) and features.dtype == np.float32


def test_batches_hold_the_speech_positions_features_waveforms_and_transcript_targets(prepared_speech):
    dm = datamodule(prepared_speech, batch_size=5)
    assert dm.sample_rate == 16_000 and (dm.speech_start_id, dm.speech_end_id) == (
        dm.manifest.data["tokenizer"]["special_ids"]["speech_start"],
        dm.manifest.data["tokenizer"]["special_ids"]["speech_end"])
    tokenizer = Tokenizer.load(dm.tokenizer)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"tokens", "speech_mask", "targets", "features", "feature_lengths", "waveform",
                          "waveform_lengths", "skipped_audio"}
    tokens, speech, targets = batch["tokens"], batch["speech_mask"], batch["targets"]
    assert tokens.dtype == targets.dtype == batch["feature_lengths"].dtype == batch["waveform_lengths"].dtype
    assert speech.dtype == torch_bool() and tokens.shape == speech.shape == targets.shape
    assert batch["features"].shape[:2] == (5, 80) and batch["features"].shape[2] == batch["feature_lengths"].max()
    assert batch["waveform"].shape == (5, int(batch["waveform_lengths"].max()))
    assert batch["feature_lengths"].tolist() == (batch["waveform_lengths"] // 160).tolist()
    assert batch["waveform"].abs().max() <= 1.0
    for i in range(5):
        frames = int(batch["feature_lengths"][i])
        assert int(speech[i].sum()) == frames_fn(frames) > 0
        where = speech[i].nonzero().flatten()
        first, last = int(where[0]), int(where[-1])
        assert last - first + 1 == len(where)  # one run of positions
        assert tokens[i, first - 1] == dm.speech_start_id and tokens[i, last + 1] == dm.speech_end_id
        assert tokens[i, where].eq(dm.pad_id).all()
        assert batch["features"][i, :, frames:].eq(0).all()
        assert batch["waveform"][i, int(batch["waveform_lengths"][i]):].eq(0).all()
        trained = targets[i][targets[i] != -100].tolist()
        assert trained[-1] == dm.eot_id
        words = tokenizer.decode(trained[:-1]).split()
        assert 3 <= len(words) <= 5
        assert not (targets[i] != -100)[: last + 1].any()  # nothing up to the clip is a target
        text = tokenizer.decode(tokens[i][~speech[i]].tolist())
        assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nTranscribe:"
                               "<|reserved_special_token_10|><|reserved_special_token_11|><|eot_id|>")
    val = list(dm.val_dataloader())
    manifest = json.loads((prepared_speech / "manifest.json").read_text())
    assert sum(len(b["tokens"]) for b in val) == manifest["sources"]["speech"]["splits"]["val"]["examples"]


def torch_bool():
    import torch

    return torch.bool


def test_a_clip_that_does_not_decode_is_skipped_in_training_and_masked_in_validation(
        prepared_speech, tmp_path, caplog):
    copy = tmp_path / "copy"
    shutil.copytree(prepared_speech, copy)
    manifest = damage_first_media(copy, "speech", "audio.flac")  # each shard's first clip no longer decodes
    splits = manifest["sources"]["speech"]["splits"]
    dm = datamodule(copy, batch_size=4)
    for batch, _ in zip(dm.train_dataloader(), range(-(-splits["train"]["examples"] // 4)), strict=False):
        dm.on_before_batch_transfer(batch, 0)
    assert dm.skipped_audio >= len(splits["train"]["shards"])
    assert "skipped an audio clip that does not decode" in caplog.text and "speech-0-" in caplog.text
    assert dm.state_dict()["skipped_audio"] == dm.skipped_audio
    val = [dm.on_before_batch_transfer(b, 0) for b in dm.val_dataloader()]
    assert sum(len(b["tokens"]) for b in val) == splits["val"]["examples"]
    masked = sum(int((b["targets"] != -100).sum(dim=1).eq(0).sum()) for b in val)
    assert masked == len(splits["val"]["shards"])
    assert all(int(b["speech_mask"].sum(1).min()) > 0 for b in val)  # the blank clip still has its positions


def test_the_speech_datamodule_needs_the_stages_frames_and_reads_audio_sources_only(prepared_speech, prepared_corpus):
    dm = SpeechDataModule(str(prepared_speech), num_workers=0)
    with pytest.raises(RuntimeError, match="stage=speech_adapter"):
        dm.train_dataloader()
    with pytest.raises(ManifestError, match="no audio sources.*make prepare-speech"):
        SpeechDataModule(str(prepared_corpus))


def test_the_data_config_builds_the_speech_datamodule(prepared_speech):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from herd.paths import repo_root

    cfg = OmegaConf.load(repo_root() / "configs" / "data" / "speech.yaml")
    assert cfg._target_ == "herd.data.loaders.audio.SpeechDataModule"
    assert str(cfg.data_dir).endswith("/prepared/speech")
    cfg.data_dir, cfg.seed, cfg.num_workers = str(prepared_speech), 0, 0
    dm = instantiate(cfg)
    assert [s["name"] for s in dm.sources] == ["speech"]
