"""stage=speech_adapter: the frozen backbone through a training run, the transcript loss, the baseline, the export."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers.training import compose_train, save_random_model
from herd.interop import hf
from herd.interop import speech as speech_io
from herd.model import ModelConfig
from herd.stages.base import FrozenBackboneError
from herd.stages.speech_adapter import SpeechAdapterStage
from herd.train import build, train

STEPS = 4


def compose(tmp_path, prepared_corpus, prepared_speech, *overrides):
    cfg = compose_train(tmp_path, prepared_corpus, "experiment=tiny_speech", "data.batch_size=8",
                        "data.num_workers=0", "stage.transcribe_examples=8", "stage.max_transcript_tokens=6",
                        "callbacks.progress_bar=null", *overrides)
    cfg.data.data_dir = str(prepared_speech)
    return cfg


@pytest.fixture(scope="module")
def start_model(tmp_path_factory, prepared_corpus):
    """A random backbone of the tests' shape, saved with the corpus' tokenizer."""
    return save_random_model(tmp_path_factory.mktemp("start") / "model", prepared_corpus / "tokenizer")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared_corpus, prepared_speech, start_model):
    root = tmp_path_factory.mktemp("speech_run")
    cfg = compose(root, prepared_corpus, prepared_speech, f"stage.init_from={start_model}",
                  f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={STEPS}", "validate_first=true",
                  "stage.scheduler.warmup_steps=1")
    return train(cfg)


def test_the_backbone_is_bit_identical_after_training_and_the_optimizer_holds_none_of_it(trained, start_model):
    stage = trained["stage"]
    assert trained["trainer"].global_step == STEPS
    start = hf.load(start_model)
    for name, tensor in start.state_dict().items():
        assert torch.equal(stage.model.backbone.state_dict()[name], tensor), name
    backbone = {id(p) for p in stage.model.backbone.parameters()}
    held = {id(p) for group in trained["trainer"].optimizers[0].param_groups for p in group["params"]}
    adapter = {id(p) for m in stage.model.adapter_modules() for p in m.parameters()}
    assert not held & backbone and held == adapter
    metrics = trained["metrics"]
    assert math.isfinite(metrics["val/loss"]) and metrics["val/wer"] >= 0


def test_held_out_clips_and_their_transcripts_reach_tensorboard(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = next(p.parent for p in Path(trained["trainer"].log_dir).rglob("events.out.tfevents.*"))
    events = EventAccumulator(str(folder), size_guidance={"audio": 0, "tensors": 0})
    events.Reload()
    assert {"speech/0", "speech/3"} <= set(events.Tags()["audio"])
    clip = events.Audio("speech/0")[-1]
    assert clip.sample_rate == 16000 and clip.length_frames > 8000  # a stdlib:speech clip lasts 1 to 2.5 s
    assert "transcripts/text_summary" in events.Tags()["tensors"]


def test_the_export_loads_back_with_the_same_logits(trained):
    stage = trained["stage"]
    model = stage.model.float().eval()
    assert speech_io.is_speech_model(trained["export_dir"])
    loaded = speech_io.load_speech(trained["export_dir"]).eval()
    assert loaded.speech_config == stage.speech_config
    tokens = torch.tensor([[5, 6, 0, 0, 0, 7], [8, 0, 0, 0, 9, 10]])
    mask = tokens == 0
    features = torch.randn(2, 80, 24)  # 24 mel frames: 3 adapter frames
    lengths = torch.tensor([24, 24])
    with torch.no_grad():
        assert torch.equal(loaded(tokens, features, lengths, mask), model(tokens, features, lengths, mask))


def test_a_run_continues_from_its_export(tmp_path, prepared_corpus, prepared_speech, trained):
    cfg = compose(tmp_path, prepared_corpus, prepared_speech, f"stage.init_from={trained['export_dir']}",
                  "trainer.max_steps=1", "trainer.val_check_interval=1", "stage.transcribe_examples=0")
    stage = build(cfg)["stage"]
    stage.configure_model()
    exported = speech_io.load_speech(trained["export_dir"])
    for name, tensor in exported.adapter.state_dict().items():
        assert torch.equal(stage.model.adapter.state_dict()[name], tensor), name


def stage_with_model(**kwargs) -> SpeechAdapterStage:
    stage = SpeechAdapterStage(model=ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97,
                                                 multiple_of=16), allow_random_init=True,
                               speech=dict(dim=32, n_layers=1, n_heads=4, ffn_dim=64, adapter_dim=32,
                                           adapter_heads=4, adapter_ffn_dim=64), **kwargs)
    stage.configure_model()
    return stage


def speech_batch() -> dict[str, torch.Tensor]:
    tokens = torch.tensor([[1, 3, 0, 0, 4, 5, 6, 2], [1, 3, 0, 0, 4, 7, 2, 2]])
    targets = torch.tensor([[-100, -100, -100, -100, 5, 6, 2, -100], [-100, -100, -100, -100, 7, 2, -100, -100]])
    return {"tokens": tokens, "targets": targets, "speech_mask": tokens == 0, "features": torch.randn(2, 80, 16),
            "feature_lengths": torch.tensor([16, 16])}


def test_the_transcript_loss_covers_transcript_tokens_only():
    stage = stage_with_model()
    batch = speech_batch()
    with torch.no_grad():
        hidden, targets = stage.transcript_hidden(batch)
        logits = stage.model.backbone.output(hidden)
        full = stage.model(batch["tokens"], batch["features"], batch["feature_lengths"], batch["speech_mask"])
    selected = batch["targets"] != -100
    assert torch.equal(targets, batch["targets"][selected])
    assert torch.allclose(F.cross_entropy(logits, targets), F.cross_entropy(full[selected], targets), atol=1e-6)


def test_withheld_audio_makes_the_loss_deaf_to_the_clips():
    stage = stage_with_model(withhold_audio=True)
    first = speech_batch()
    second = dict(first, features=torch.randn(2, 80, 16))
    with torch.no_grad():
        assert torch.equal(stage.transcript_hidden(first)[0], stage.transcript_hidden(second)[0])
        stage.withhold_audio = False
        assert not torch.equal(stage.transcript_hidden(first)[0], stage.transcript_hidden(second)[0])


def test_a_changed_backbone_or_an_optimizer_holding_it_is_refused():
    stage = stage_with_model()
    stage.scheduler_factory = None
    stage.optimizer_factory = lambda groups: torch.optim.AdamW([*groups, {"params": [stage.model.backbone.norm.weight]}])
    with pytest.raises(FrozenBackboneError, match="1 backbone parameter"):
        stage.configure_optimizers()
    stage.on_fit_start()
    with torch.no_grad():
        stage.model.backbone.norm.weight.add_(1.0)
    with pytest.raises(FrozenBackboneError, match="changed during training"):
        stage.on_train_end()
