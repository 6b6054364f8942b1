"""Context parallelism in training runs: a context schedule whose stages change how many ranks share a row,
killed after the change and resumed, logs the same losses as the run that was never stopped."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.training import compose_train, small_overrides, start_then_kill
from herd.train import ConfigError, build

# Stage 0: rows of 128, the two ranks read rows of their own (context_parallel: 1), 2 x 2 x 128 = 512
# tokens a step, 4 steps. Stage 1: rows of 256 shared by both ranks (context_parallel: 2), 2 x 256 =
# 512 tokens a step, 8 steps. The checkpoint of step 6 lies two steps into stage 1.
SCHEDULE = ("+callbacks.context_schedule={_target_: herd.callbacks.schedules.ContextSchedule, tokens_per_batch: 256, "
            "stages: [{seq_len: 128, tokens: 2048, context_parallel: 1}, "
            "{seq_len: 256, tokens: 4096, batch_size: 2, context_parallel: 2}], "
            "gate: {on_fail: warn}, needle: {lengths: [128], depths: [0.5], trials: 1}, short_val_batches: 1}")
STEPS = 12


def command(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "herd.train", *small_overrides(data_dir), f"hydra.run.dir={run_dir}",
            f"paths.log_dir={run_dir.parent}", "strategy=fsdp2_cp", "trainer.devices=2", "trainer.max_steps=100",
            "trainer.precision=32-true", "trainer.log_every_n_steps=1", "trainer.val_check_interval=100",
            "callbacks.last_checkpoint.every_n_train_steps=6", "logger=many",
            "validate_first=false", "export=false", "stage.scheduler.warmup_steps=2", SCHEDULE, *extra]


def logged(run_dir: Path) -> dict[int, tuple[float, float]]:
    """Per step: train/loss and train/tokens_seen."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("train/loss")]
    return {int(row["step"]): (float(row["train/loss"]), float(row["train/tokens_seen"])) for row in rows}


@pytest.mark.slow
def test_a_context_stage_change_resumes_exactly_after_a_kill(tmp_path, prepared_corpus):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    result = subprocess.run(command(prepared_corpus, full), env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    reference = logged(full)
    assert sorted(reference) == list(range(STEPS))
    assert reference[STEPS - 1][1] == 2048 + 4096  # tokens counted once per row, whichever ranks share it
    # the end-of-training text samples ran on both ranks: a sharded model computes only with every rank (rank 0
    # alone used to wait for the other forever, so the run never ended)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((full / "tensorboard").rglob("events.out.tfevents.*")).parent)).Reload()
    assert any(tag.startswith("samples/") for tag in events.Tags()["tensors"])

    killed = tmp_path / "killed"
    last = killed / "checkpoints" / "last.ckpt"
    start_then_kill(command(prepared_corpus, killed), env, (last / ".metadata").exists)  # both ranks

    resumed = tmp_path / "resumed"
    result = subprocess.run(command(prepared_corpus, resumed, f"ckpt_path={last}"), env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    after = logged(resumed)
    assert min(after) == 6 and sorted(after) == list(range(6, STEPS))  # from the checkpoint inside stage 1
    for step, (loss, tokens) in after.items():
        assert loss == pytest.approx(reference[step][0], rel=1e-5), step
        assert tokens == reference[step][1]


@pytest.mark.parametrize(("overrides", "message"), [
    (["experiment=tiny_reward", "stage.allow_random_init=true"], "RewardStage does not run under context parallelism"),
    (["data.seq_len=66"], "data.seq_len=66 does not cut into 2 x strategy.context_parallel_size = 4"),
])
def test_what_context_parallelism_cannot_run_is_refused_before_anything_is_built(tmp_path, prepared_corpus,
                                                                                  overrides, message):
    cfg = compose_train(tmp_path, prepared_corpus, "strategy=fsdp2_cp", "trainer.devices=2", *overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        build(cfg)
