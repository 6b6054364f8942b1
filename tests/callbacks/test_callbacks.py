"""Batch/sequence ramp, checkpoint averaging, throughput/MFU and atomic checkpoint writes."""

from __future__ import annotations

import pytest
import torch

from helpers.fitting import Recorder, fit
from helpers.training import compose_train
from herd.callbacks.averaging import CheckpointAveraging
from herd.callbacks.schedules import BatchRamp
from herd.train import build

RAMP = ("callbacks.batch_ramp={_target_: herd.callbacks.schedules.BatchRamp, stages: ["
        "{after_tokens: 0, batch_size: 8, seq_len: 64}, {after_tokens: 2048, batch_size: 4, seq_len: 128}, "
        "{after_tokens: 4096, batch_size: 8, seq_len: 128}]}")


def test_batch_ramp_switches_shapes_at_the_token_thresholds(tmp_path, prepared_corpus):
    cfg = compose_train(tmp_path, prepared_corpus, RAMP, "trainer.max_steps=10", "trainer.val_check_interval=10",
                        "callbacks.text_samples=null", "logger=csv")
    recorder = Recorder()
    objects = fit(cfg, recorder)
    # 8 x 64 = 512 tokens a step: 4 steps reach 2,048; then 4 x 128 = 512 a step up to 4,096; then 8 x 128.
    assert recorder.shapes == [(8, 64)] * 4 + [(4, 128)] * 4 + [(8, 128)] * 2
    assert objects["stage"].tokens_seen == 4 * 512 + 4 * 512 + 2 * 1024


def test_batch_ramp_reports_its_final_batch_and_refuses_a_late_start():
    ramp = BatchRamp([{"after_tokens": 0, "batch_size": 2, "seq_len": 8}, {"after_tokens": 100, "batch_size": 4,
                                                                          "seq_len": 16}])
    assert ramp.stage_at(99) == 0 and ramp.stage_at(100) == 1
    with pytest.raises(ValueError, match="after_tokens: 0"):
        BatchRamp([{"after_tokens": 5, "batch_size": 1, "seq_len": 8}])


def test_averaging_over_annealing_is_the_mean_of_those_checkpoints(tmp_path, prepared_corpus):
    cfg = compose_train(tmp_path, prepared_corpus, "trainer.max_steps=10", "trainer.val_check_interval=10",
                        "stage.scheduler.warmup_steps=2", "stage.scheduler.anneal_steps=4",
                        "callbacks.averaging={_target_: herd.callbacks.averaging.CheckpointAveraging}",
                        "callbacks.text_samples=null", "logger=csv")
    recorder = Recorder()
    objects = fit(cfg, recorder)
    averaging = next(c for c in objects["trainer"].callbacks if isinstance(c, CheckpointAveraging))
    window = [step for step in recorder.weights if step >= 6]
    assert averaging.count == len(window) == 5
    assert recorder.lrs[-1] == pytest.approx(0.0, abs=1e-12)  # annealed to zero at the last step
    final = dict(objects["stage"].model.named_parameters())
    for name, param in final.items():
        expected = torch.stack([recorder.weights[s][name] for s in window]).mean(0)
        assert torch.allclose(param, expected, atol=1e-6), name
    assert not torch.equal(final["norm.weight"], recorder.weights[10]["norm.weight"])


def test_throughput_logs_tokens_per_second_and_mfu(tmp_path, prepared_corpus):
    cfg = compose_train(tmp_path, prepared_corpus, "trainer.max_steps=3", "trainer.val_check_interval=3",
                        "callbacks.throughput.peak_flops_per_device=1e12", "callbacks.text_samples=null",
                        "trainer.log_every_n_steps=1", "logger=csv")
    objects = fit(cfg)
    metrics = objects["trainer"].callback_metrics
    tokens_per_s = float(metrics["train/tokens_per_s"])
    flops = objects["stage"].model_config.flops_per_token(64)
    assert tokens_per_s > 0
    assert float(metrics["train/mfu"]) == pytest.approx(flops * tokens_per_s / 1e12, rel=1e-4)


def test_the_cpu_peak_is_measured_once_per_machine_and_cached(tmp_path, monkeypatch):
    from herd.callbacks import throughput

    calls = []
    monkeypatch.setattr(throughput, "measure_cpu_peak_flops", lambda: calls.append(1) or 1.5e12)
    cache = tmp_path / "herd" / "cpu_peak_flops.json"
    first, where_first = throughput.cpu_peak_flops(cache)
    second, where_second = throughput.cpu_peak_flops(cache)
    assert first == second == 1.5e12 and len(calls) == 1
    assert "measured now" in where_first and str(cache) in where_second and "cached" in where_second
    cache.write_text("not json")  # a damaged cache is measured again, not an error
    assert throughput.cpu_peak_flops(cache)[0] == 1.5e12 and len(calls) == 2


def test_a_configured_peak_is_used_as_given(tmp_path, prepared_corpus):
    cfg = compose_train(tmp_path, prepared_corpus, "callbacks.throughput.peak_flops_per_device=2.0e12", "debug=fast")
    objects = build(cfg)
    throughput = next(c for c in objects["trainer"].callbacks if type(c).__name__ == "Throughput")
    throughput.on_fit_start(objects["trainer"], objects["stage"])
    assert throughput.peak_flops_per_device == 2.0e12
