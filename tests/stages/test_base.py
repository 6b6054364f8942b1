"""BackboneStage's shared guards: non-finite steps stop or are skipped, and never reach a checkpoint or export."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

import herd.stages.pretrain as pretrain
from helpers.training import compose_train
from herd.export import read_checkpoint
from herd.stages.base import NonFiniteError
from herd.train import ConfigError, train

SHORT = ["trainer.val_check_interval=4", "callbacks.last_checkpoint.every_n_train_steps=2", "callbacks.text_samples=null",
         "stage.scheduler.warmup_steps=1", "trainer.precision=32-true"]


def assert_finite_checkpoints(run_dir):
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    for checkpoint in checkpoints:
        _, state = read_checkpoint(checkpoint)
        assert all(torch.isfinite(t).all() for t in state.values()), checkpoint
    return checkpoints


def test_a_far_too_high_learning_rate_stops_with_the_step_and_the_fix(tmp_path, prepared_corpus):
    cfg = compose_train(tmp_path, prepared_corpus, "trainer.max_steps=30", "stage.optimizer.lr=1e4", *SHORT)
    with pytest.raises(NonFiniteError, match=r"at step \d+ .*stage\.optimizer\.lr") as error:
        train(cfg)
    run_dir = tmp_path / "logs" / "run"
    stopped_at = int(str(error.value).split("at step ")[1].split()[0])
    assert stopped_at < 30  # it did not run to the end on NaN
    assert_finite_checkpoints(run_dir)  # neither last nor best holds a NaN
    assert not (run_dir / "export").exists()


class NaNAtSteps:
    """Replaces the training loss with NaN at the given optimizer steps."""

    def __init__(self, steps, stage_holder):
        self.steps, self.holder = set(steps), stage_holder

    def __call__(self, model, batch, chunk_size=None, context=None):
        loss, n_tokens = self.original(model, batch, chunk_size, context=context)
        stage = self.holder["stage"]
        if stage is not None and stage.training and stage.trainer.global_step in self.steps:
            loss = loss * float("nan")
        return loss, n_tokens


class Weights(L.Callback):
    """The weights before and after each optimizer step, and the Adam step count at the end."""

    def __init__(self, holder):
        self.holder, self.before, self.after = holder, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.holder["stage"] = pl_module
        self.before[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = [p.detach().clone() for p in pl_module.parameters()]


def run_with_nans(tmp_path, prepared_corpus, monkeypatch, nan_steps, *overrides):
    holder = {"stage": None}
    fake = NaNAtSteps(nan_steps, holder)
    fake.original = pretrain.next_token_loss
    monkeypatch.setattr(pretrain, "next_token_loss", fake)
    recorder = Weights(holder)
    cfg = compose_train(tmp_path, prepared_corpus, *SHORT, *overrides)
    import herd.train as herd_train

    build = herd_train.build

    def build_with_recorder(cfg):
        objects = build(cfg)
        objects["trainer"].callbacks.append(recorder)
        return objects

    monkeypatch.setattr(herd_train, "build", build_with_recorder)
    return cfg, recorder


def test_skip_step_drops_the_update_counts_it_and_the_run_goes_on(tmp_path, prepared_corpus, monkeypatch):
    cfg, weights = run_with_nans(tmp_path, prepared_corpus, monkeypatch, {2, 5}, "trainer.max_steps=8",
                                 "stage.on_nonfinite=skip_step")
    result = train(cfg)
    assert result["metrics"]["train/skipped_steps"] == 2
    for step in (2, 5):  # the skipped steps left every weight as it was
        assert all(torch.equal(a, b) for a, b in zip(weights.before[step], weights.after[step], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(weights.before[3], weights.after[3], strict=True))
    adam_steps = {int(state["step"]) for state in result["trainer"].optimizers[0].state.values()}
    assert adam_steps == {8 - 2}
    assert math.isfinite(result["metrics"]["val/loss"])
    assert (tmp_path / "logs" / "run" / "export" / "model.safetensors").is_file()
    assert_finite_checkpoints(tmp_path / "logs" / "run")


def test_skip_step_stops_after_too_many_in_a_row(tmp_path, prepared_corpus, monkeypatch):
    cfg, _ = run_with_nans(tmp_path, prepared_corpus, monkeypatch, {3, 4, 5, 6}, "trainer.max_steps=10",
                           "stage.on_nonfinite=skip_step", "stage.max_consecutive_skips=3")
    with pytest.raises(NonFiniteError, match=r"3 non-finite steps in a row up to step 5"):
        train(cfg)
    assert not (tmp_path / "logs" / "run" / "export").exists()


def test_stop_names_the_step_and_loss(tmp_path, prepared_corpus, monkeypatch):
    cfg, weights = run_with_nans(tmp_path, prepared_corpus, monkeypatch, {3}, "trainer.max_steps=10")
    with pytest.raises(NonFiniteError, match=r"non-finite training step at step 3 \(loss nan"):
        train(cfg)
    assert 3 not in weights.after  # stopped before the update


def test_bad_nonfinite_settings_name_the_key(tmp_path, prepared_corpus):
    for override, named in (("stage.on_nonfinite=ignore", "stage.on_nonfinite"),
                            ("stage.max_consecutive_skips=0", "stage.max_consecutive_skips")):
        with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
            train(compose_train(tmp_path, prepared_corpus, override))


CONTINUING = {"long_context": "LongContextStage", "sft": "SFTStage", "reward": "RewardStage", "dpo": "DPOStage",
              "vision_adapter": "VisionAdapterStage", "speech_adapter": "SpeechAdapterStage"}


def _stage_from_config(tmp_path, *overrides):
    from hydra.utils import instantiate

    from herd.train import model_config_of

    cfg = compose_train(tmp_path, None, *overrides)
    return instantiate(cfg.stage, _partial_=True, _convert_="all")(model=model_config_of(cfg))


def test_every_stage_that_continues_a_model_says_so_in_its_class():
    """The stage configs whose class continues a model are exactly the six (pretrain does not)."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from herd.presets import config_dir

    continuing = set()
    for path in sorted((config_dir() / "stage").glob("*.yaml")):
        target = OmegaConf.load(path).get("_target_")
        if get_class(target).continues_model:
            continuing.add(path.stem)
        assert (get_class(target).__name__ == CONTINUING[path.stem]) if path.stem in CONTINUING else True
    assert continuing == set(CONTINUING)


@pytest.mark.parametrize("stage", sorted(CONTINUING))
def test_a_stage_that_continues_a_model_refuses_no_init_from_unless_random_init_is_allowed(tmp_path, stage):
    with pytest.raises(ValueError) as refused:
        _stage_from_config(tmp_path, f"stage={stage}")
    message = str(refused.value)
    assert message.startswith(f"stage={stage} continues a trained model and needs stage.init_from=<model directory>: ")
    assert message.endswith("or stage.allow_random_init=true to start from random weights on purpose (tests, smoke runs)")
    assert "\n" not in message
    built = _stage_from_config(tmp_path, f"stage={stage}", "stage.allow_random_init=true")  # the escape
    assert type(built).__name__ == CONTINUING[stage] and built.init_from is None
    built.configure_model()  # random weights
    assert sum(p.numel() for p in built.model.parameters()) > 0


def test_an_experiment_without_init_from_fails_before_anything_runs(tmp_path, prepared_corpus, prepared_images):
    """experiment=tiny_vision (its stage.init_from: null, required) is refused by herd.train's build as one line;
    a pretraining run needs none."""
    from herd.train import build

    cfg = compose_train(tmp_path, prepared_corpus, "experiment=tiny_vision", "data.num_workers=0")
    cfg.data.data_dir = str(prepared_images)
    with pytest.raises(ConfigError, match=r"^stage=vision_adapter continues a trained model and needs stage\.init_from"):
        build(cfg)
    assert type(_stage_from_config(tmp_path)).__name__ == "PretrainStage"


def test_annealing_without_init_from_is_refused(tmp_path, prepared_corpus):
    """experiment=anneal_valuation anneals a partly trained model: without stage.init_from it would anneal
    random weights, so it is refused like the other stages that continue a model."""
    from herd.train import build

    cfg = compose_train(tmp_path, prepared_corpus, "experiment=anneal_valuation",
                        f"data.sources.candidate.data_dir={prepared_corpus}", "data.sources.candidate.source=prose")
    with pytest.raises(ConfigError, match=r"^stage=anneal continues a trained model and needs stage\.init_from"):
        build(cfg)
