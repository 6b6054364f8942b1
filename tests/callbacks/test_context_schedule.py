"""Long-context stages: advance at the right token counts, change the context, gates act as configured."""

from __future__ import annotations

import lightning as L
import pytest

from helpers.fitting import Recorder, fit
from helpers.training import compose_train
from herd.callbacks.schedules import ContextSchedule


def schedule(on_fail="warn", min_needle=0.0, extra="", first_stage=""):
    return ("callbacks.context_schedule={_target_: herd.callbacks.schedules.ContextSchedule, tokens_per_batch: 1024, "
            f"stages: [{{seq_len: 128, tokens: 2048{first_stage}}}, {{seq_len: 256, tokens: 4096, rope_theta: 1000000.0}}], "
            f"gate: {{min_needle_accuracy: {min_needle}, on_fail: {on_fail}{extra}}}, "
            "needle: {lengths: [128, 256], depths: [0.5], trials: 1}, short_val_batches: 2}")


class MixtureRecorder(L.Callback):
    """The mixture weights of the train loader that gave each step's batch."""

    def __init__(self):
        self.weights = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        plan = trainer.train_dataloader.dataset.plan
        self.weights.append(dict(zip(plan.sources, plan.weights, strict=True)))


def run(tmp_path, prepared_corpus, spec, *more, callbacks=()):
    cfg = compose_train(tmp_path, prepared_corpus, spec, "trainer.max_steps=100", "trainer.val_check_interval=100",
                        "callbacks.text_samples=null", "logger=csv", "validate_first=false", "export=false", *more)
    recorder = Recorder()
    objects = fit(cfg, recorder, *callbacks)
    callback = next(c for c in objects["trainer"].callbacks if isinstance(c, ContextSchedule))
    return recorder, callback, objects


def test_stages_advance_at_their_token_counts_and_change_the_context(tmp_path, prepared_corpus):
    recorder, callback, objects = run(tmp_path, prepared_corpus, schedule())
    # 1,024 tokens a step: 2 steps of 8 x 128, then 4 steps of 4 x 256; then the schedule ends the run.
    assert recorder.shapes == [(8, 128)] * 2 + [(4, 256)] * 4
    assert objects["stage"].tokens_seen == 6144
    assert [r["stage"] for r in callback.results] == [0, 1] and all(r["passed"] for r in callback.results)
    model = objects["stage"].model
    assert model.config.rope_theta == 1_000_000.0 and model.config.max_seq_len >= 256
    assert callback.baseline_short_loss > 0


def test_a_failed_gate_stops_the_run_when_configured(tmp_path, prepared_corpus):
    recorder, callback, _ = run(tmp_path, prepared_corpus, schedule(on_fail="stop", min_needle=1.5))
    assert recorder.shapes == [(8, 128)] * 2
    assert [r["passed"] for r in callback.results] == [False]


def test_a_failed_gate_extends_the_stage_then_stops(tmp_path, prepared_corpus):
    spec = schedule(on_fail="extend", min_needle=1.5, extra=", extend_tokens: 2048, max_extensions: 1")
    recorder, callback, _ = run(tmp_path, prepared_corpus, spec)
    assert recorder.shapes == [(8, 128)] * 4  # 2,048 tokens, then 2,048 more at the same length; then stop
    assert callback.extensions == 1 and [r["passed"] for r in callback.results] == [False, False]


def test_a_failed_gate_only_warns_when_configured(tmp_path, prepared_corpus):
    recorder, callback, _ = run(tmp_path, prepared_corpus, schedule(on_fail="warn", min_needle=1.5))
    assert recorder.shapes == [(8, 128)] * 2 + [(4, 256)] * 4
    assert [r["passed"] for r in callback.results] == [False, False]


def test_bad_gate_settings_are_refused():
    with pytest.raises(ValueError, match="gate.on_fail='retry'"):
        ContextSchedule([{"seq_len": 64, "tokens": 10}], tokens_per_batch=64, gate={"on_fail": "retry"})
    with pytest.raises(ValueError, match="context stage 0 needs seq_len and tokens"):
        ContextSchedule([{"seq_len": 64}], tokens_per_batch=64)


def test_a_stage_sets_its_mixture_and_the_lr_schedule_spans_the_stages(tmp_path, prepared_corpus):
    mixture = MixtureRecorder()
    _, callback, objects = run(tmp_path, prepared_corpus, schedule(first_stage=", weights: {code: 0.0}"),
                               "data.sources.prose.weight=0.6", "data.sources.code.weight=0.4", callbacks=[mixture])
    # stage 0 reads prose only; stage 1 names no weights, so the configured mixture comes back
    assert mixture.weights == [{"prose": 0.6, "code": 0.0}] * 2 + [{"prose": 0.6, "code": 0.4}] * 4
    assert callback.planned_steps(objects["trainer"]) == 6
    assert objects["stage"].lr_schedule.total_steps == 6  # not trainer.max_steps=100


def test_bad_stage_keys_and_weights_are_refused(tmp_path, prepared_corpus):
    with pytest.raises(ValueError, match=r"context stage 0: unknown key\(s\) \['weight'\]"):
        ContextSchedule([{"seq_len": 64, "tokens": 10, "weight": {"a": 1}}], tokens_per_batch=64)
    with pytest.raises(ValueError, match=r"unknown source\(s\) \['web'\]"):
        run(tmp_path, prepared_corpus, schedule(first_stage=", weights: {web: 1.0}"))


class _Strategy:
    """What the schedule reads of strategy=fsdp2_cp: 256 ranks = 16 data-parallel x 16 context-parallel."""

    context_parallel_size = 16
    active_context_parallel_size = 16
    distributed_sampler_kwargs = {"num_replicas": 16, "rank": 0}


def test_the_paper_recipe_keeps_16m_tokens_per_step_while_context_parallelism_grows():
    from types import SimpleNamespace

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from herd.presets import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=llama3_long_context", "stage.init_from=/models/x"])
    assert cfg.trainer.strategy.context_parallel_size == 16
    schedule = instantiate(cfg.callbacks.context_schedule)
    trainer = SimpleNamespace(strategy=_Strategy())
    per_step = []
    for index, stage in enumerate(schedule.stages):
        sharing = schedule.context_stages[index]["context_parallel"]
        assert stage.seq_len // sharing == 8192  # every GPU holds 8K tokens of each row
        replicas = schedule.replicas(trainer, index)
        assert replicas == 256 // sharing
        per_step.append(schedule.batch_size(trainer, index) * stage.seq_len * replicas)
    assert per_step == [16 * 2**20] * len(schedule.stages)
