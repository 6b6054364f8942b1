"""stage=reward and stage=dpo through herd.train on prepared preference rankings: exports, checkpoints, resume."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from helpers.training import PREFERENCE_SEQ_LEN, compose_train
from herd.export import export
from herd.interop import hf
from herd.model import ModelConfig, Transformer
from herd.train import train


def _start(tmp_path, cfg, prepared_corpus):
    model = Transformer(ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True)))
    return str(hf.save(model, tmp_path / "start", tokenizer=prepared_corpus / "tokenizer"))


def _compose(tmp_path, prepared_corpus, prepared_preferences, stage, *overrides):
    cfg = compose_train(tmp_path, prepared_preferences, f"stage={stage}", f"data.seq_len={PREFERENCE_SEQ_LEN}", "data.sources=null",
                        "data.batch_size=4", "callbacks.text_samples=null", "trainer.val_check_interval=2",
                        "callbacks.last_checkpoint.every_n_train_steps=2", *overrides)
    cfg.stage.init_from = _start(tmp_path, cfg, prepared_corpus)
    return cfg


def test_a_reward_run_exports_a_reward_model_and_its_checkpoint_exports_the_same_head(
        tmp_path, prepared_corpus, prepared_preferences):
    cfg = _compose(tmp_path, prepared_corpus, prepared_preferences, "reward", "trainer.max_steps=2",
                   "stage.optimizer.lr=1e-3")
    result = train(cfg)
    assert 0.0 <= result["metrics"]["val/accuracy"] <= 1.0 and "val/accuracy_0v2" in result["metrics"]
    exported = hf.load_reward_model(result["export_dir"])
    head = result["stage"].value_head.weight.detach()
    assert torch.equal(exported.head.weight, head)
    again = export(tmp_path / "logs" / "run" / "checkpoints" / "last.ckpt", tmp_path / "from_ckpt")
    assert hf.is_reward_model(again) and torch.equal(hf.load_reward_model(again).head.weight, head)


def test_dpo_starts_at_ln_2_and_a_resumed_run_keeps_the_precomputed_reference(
        tmp_path, prepared_corpus, prepared_preferences):
    cfg = _compose(tmp_path, prepared_corpus, prepared_preferences, "dpo", "trainer.max_steps=2",
                   "stage.nll_weight=0.0", "stage.optimizer.lr=1e-3")
    first = train(cfg)
    assert first["start"]["val/loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference
    assert first["start"]["val/rewards/margin"] == pytest.approx(0.0, abs=1e-4)
    reference = dict(first["stage"].reference_logps)
    checkpoint = torch.load(tmp_path / "logs" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert len(checkpoint["herd"]["dpo_reference_logps"]) == len(reference) > 0
    cfg.trainer.max_steps = 4
    cfg.ckpt_path = str(tmp_path / "logs" / "run" / "checkpoints" / "last.ckpt")
    resumed = train(cfg)
    assert resumed["trainer"].global_step == 4
    assert resumed["stage"].reference_logps.keys() == reference.keys()
    assert all(torch.equal(resumed["stage"].reference_logps[k], v) for k, v in reference.items())
