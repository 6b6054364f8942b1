"""stage=vision_adapter: the frozen backbone through a training run, the caption loss, the baseline, the export."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import MllamaForConditionalGeneration

from helpers.training import compose_train, save_random_model
from herd.interop import hf, mllama
from herd.model import ModelConfig, Transformer
from herd.model.vision import ImageBatch, VisionConfig, VisionLanguageModel
from herd.stages.vision_adapter import FrozenBackboneError, VisionAdapterStage
from herd.train import ConfigError, build, train

STEPS = 4


def compose(tmp_path, prepared_corpus, prepared_images, *overrides):
    cfg = compose_train(tmp_path, prepared_corpus, "experiment=tiny_vision", "data.batch_size=8",
                        "data.num_workers=0", "stage.caption_examples=8", "stage.max_caption_tokens=6",
                        "callbacks.progress_bar=null", *overrides)
    cfg.data.data_dir = str(prepared_images)
    return cfg


@pytest.fixture(scope="module")
def start_model(tmp_path_factory, prepared_corpus):
    """A random backbone of the tests' shape, saved with the corpus' tokenizer."""
    return save_random_model(tmp_path_factory.mktemp("start") / "model", prepared_corpus / "tokenizer")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared_corpus, prepared_images, start_model):
    root = tmp_path_factory.mktemp("vision_run")
    cfg = compose(root, prepared_corpus, prepared_images, f"stage.init_from={start_model}",
                  f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={STEPS}", "validate_first=true",
                  "stage.optimizer.lr=3e-3", "stage.scheduler.warmup_steps=1")
    return train(cfg)


def test_the_backbone_is_bit_identical_after_training_and_the_optimizer_holds_none_of_it(trained, start_model):
    stage = trained["stage"]
    assert trained["trainer"].global_step == STEPS
    start = hf.load(start_model)
    for name, tensor in start.state_dict().items():
        assert torch.equal(stage.model.backbone.state_dict()[name], tensor), name
    backbone = {id(p) for p in stage.model.backbone.parameters()}
    held = {id(p) for group in trained["trainer"].optimizers[0].param_groups for p in group["params"]}
    assert not held & backbone
    adapter = {id(p) for m in stage.model.adapter_modules() for p in m.parameters()}
    assert held == adapter
    assert all(float(block.attention_gate.detach()) != 0 for block in stage.model.cross_layers)  # the adapter trained
    metrics = trained["metrics"]
    assert math.isfinite(metrics["val/loss"]) and 0 <= metrics["val/caption_exact"] <= 1
    assert "val/caption_word_accuracy" in metrics


def test_the_export_is_an_mllama_directory_with_the_same_logits(trained):
    stage = trained["stage"]
    model = stage.model.float().eval()
    reference = MllamaForConditionalGeneration.from_pretrained(trained["export_dir"], dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    loaded = mllama.load_vision(trained["export_dir"])
    assert loaded.config.tie_embeddings and loaded.cross_positions == stage.model.cross_positions
    assert dataclasses.replace(loaded.vision_config, cross_attention_layers=None, cross_attention_every=1) == \
        stage.vision_config
    tokens = torch.tensor([[512, 1, 40, 41, 42, 43], [512, 1, 44, 45, 46, 47]])  # <|image|> = vocab_size
    pixels = torch.randn(2, 4, 3, 32, 32)
    images = ImageBatch(pixels, torch.tensor([6, 6]), torch.tensor([4, 4]), torch.tensor([0, 1]))
    with torch.no_grad():
        expected = reference(input_ids=tokens, pixel_values=pixels[:, None], aspect_ratio_ids=torch.tensor([[6], [6]]),
                             aspect_ratio_mask=torch.ones(2, 1, 4, dtype=torch.long),
                             cross_attention_mask=torch.ones(2, 6, 1, 4, dtype=torch.long)).logits
        assert (model(tokens, images) - expected).abs().max() < 1e-4
        assert torch.equal(loaded(tokens, images), model(tokens, images))


def stage_with_model(**kwargs) -> VisionAdapterStage:
    stage = VisionAdapterStage(model=ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97,
                                                 multiple_of=16), allow_random_init=True,
                               vision=dict(image_size=16, patch_size=4, dim=32, n_layers=2, n_global_layers=1,
                                           n_heads=4, ffn_dim=64, feature_layers=[0], cross_attention_every=1),
                               **kwargs)
    stage.configure_model()
    return stage


def caption_batch() -> dict[str, torch.Tensor]:
    tokens = torch.tensor([[97, 1, 5, 6, 7, 2], [97, 1, 8, 9, 2, 2]])
    targets = torch.tensor([[-100, 5, 6, 7, 2, -100], [-100, 8, 9, 2, -100, -100]])  # caption + eos only
    return {"tokens": tokens, "targets": targets, "pixel_values": torch.randn(2, 1, 3, 16, 16),
            "aspect_ratio_ids": torch.tensor([1, 1]), "num_tiles": torch.tensor([1, 1]),
            "image_rows": torch.tensor([0, 1])}


def test_the_caption_loss_covers_caption_tokens_only():
    stage = stage_with_model()
    with torch.no_grad():
        for block in stage.model.cross_layers:
            block.attention_gate.fill_(0.5)
        batch = caption_batch()
        hidden, targets = stage.caption_hidden(batch)
        logits = stage.model.backbone.output(hidden)
        full = stage.model(batch["tokens"], stage.images(batch))
    selected = batch["targets"] != -100
    assert torch.equal(targets, batch["targets"][selected])
    expected = F.cross_entropy(full[selected], batch["targets"][selected])
    assert torch.allclose(F.cross_entropy(logits, targets), expected, atol=1e-6)


def test_withheld_images_make_the_loss_blind_to_the_pictures():
    stage = stage_with_model(withhold_images=True)
    with torch.no_grad():
        for block in stage.model.cross_layers:
            block.attention_gate.fill_(0.5)
        first = caption_batch()
        second = dict(first, pixel_values=torch.randn(2, 1, 3, 16, 16))
        assert torch.equal(stage.caption_hidden(first)[0], stage.caption_hidden(second)[0])
        stage.withhold_images = False
        assert not torch.equal(stage.caption_hidden(first)[0], stage.caption_hidden(second)[0])


def test_the_gates_learn_at_their_own_rate():
    stage = stage_with_model(gate_lr_scale=30.0)
    stage.scheduler_factory = None
    groups = stage.configure_optimizers()["optimizer"].param_groups
    gates = {id(b.attention_gate) for b in stage.model.cross_layers} | {id(b.ffn_gate) for b in stage.model.cross_layers}
    assert {id(p) for p in groups[-1]["params"]} == gates
    assert groups[-1]["lr"] == pytest.approx(30 * groups[0]["lr"]) and groups[-1]["weight_decay"] == 0.0
    assert not any(id(p) in gates for group in groups[:-1] for p in group["params"])


def test_an_optimizer_holding_backbone_weights_is_refused():
    stage = stage_with_model()
    stage.model.backbone.layers[0].attention.wq.weight.requires_grad_(True)
    stage.trained_modules = lambda: [stage.model]  # as if a change trained the whole model
    stage.scheduler_factory = None
    with pytest.raises(FrozenBackboneError, match="1 backbone parameter"):
        stage.configure_optimizers()


def test_a_changed_backbone_is_caught_at_the_end_of_training():
    stage = stage_with_model()
    stage.on_fit_start()
    stage.on_train_end()  # unchanged: fine
    with torch.no_grad():
        stage.model.backbone.norm.weight[0] += 1e-6
    with pytest.raises(FrozenBackboneError, match="changed during training"):
        stage.on_train_end()


def test_an_mllama_directory_continues_with_its_own_adapter(tmp_path):
    backbone = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16))
    vision = VisionConfig(image_size=16, patch_size=4, dim=32, n_layers=2, n_global_layers=1, n_heads=4, ffn_dim=64,
                          feature_layers=(0,), cross_attention_layers=(1,))
    start = VisionLanguageModel(backbone, vision)
    path = mllama.save_vision(start, tmp_path / "mllama")
    stage = VisionAdapterStage(model=backbone.config, init_from=str(path), vision={"dim": 999})
    stage.configure_model()
    assert stage.vision_config == vision and stage.model.cross_positions == (1,)
    for name, tensor in start.state_dict().items():
        assert torch.equal(stage.model.state_dict()[name], tensor), name
    assert not any(p.requires_grad for p in stage.model.backbone.parameters())


def test_text_data_is_refused_naming_the_data_option(tmp_path, prepared_corpus, start_model):
    cfg = compose_train(tmp_path, prepared_corpus, "stage=vision_adapter", f"stage.init_from={start_model}",
                        "trainer.max_steps=1", "validate_first=false")
    with pytest.raises((ValueError, ConfigError), match="data=images"):
        train(cfg)
    assert build(cfg)["stage"].vision_config.image_size == 32  # the tiny vision preset
