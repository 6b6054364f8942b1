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


@pytest.mark.slow
def test_a_dpo_checkpoint_on_re_prepared_data_is_refused_before_training(tmp_path, prepared_corpus,
                                                                         prepared_preferences):
    """The precomputed reference log-probs are keyed by the rows they were computed on: after the data folder is
    prepared again from other rankings, resuming fails at start, naming both data fingerprints, whatever
    resume_with_changes says (it used to fail mid-training: "a batch row has no precomputed reference log-probs")."""
    import shutil

    from hydra import compose, initialize_config_dir

    from herd.prepare import prepare
    from herd.presets import config_dir
    from herd.stages.checkpoint_io import checkpoint_metadata
    from herd.train import ConfigError

    data = tmp_path / "data"
    shutil.copytree(prepared_preferences, data)
    cfg = _compose(tmp_path, prepared_corpus, data, "dpo", "trainer.max_steps=2", "export=false",
                   "validate_first=false")
    train(cfg)
    last = tmp_path / "logs" / "run" / "checkpoints" / "last.ckpt"
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        again = compose("prepare", overrides=[
            f"output_dir={data}", "~sources", "+sources={preferences: {input: 'stdlib:preferences?max_per_module=1&seed=2'}}",
            f"seq_len={PREFERENCE_SEQ_LEN}", "val_fraction=0.1", "num_proc=1", "progress=false",
            f"tokenizer.path={prepared_corpus / 'tokenizer'}", "shards.max_rows=64", "shards.min_count=2"])
    prepare(again)
    cfg.trainer.max_steps = 4
    cfg.ckpt_path = str(last)
    for flag in (False, True):
        cfg.resume_with_changes = flag
        with pytest.raises(ConfigError, match=r"was trained on other data than .* holds now \(data fingerprint "
                                              r"[0-9a-f]{16} vs [0-9a-f]{16}: it was prepared again since\), and it "
                                              r"keeps its precomputed reference log-probs") as refused:
            train(cfg)
        assert "\n" not in str(refused.value)  # herd.train prints it as one line, exit status 2
    assert checkpoint_metadata(last)["global_step"] == 2  # nothing trained
