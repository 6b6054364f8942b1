"""A run killed with SIGKILL and resumed logs the same losses as an uninterrupted run."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.training import small_overrides, start_then_kill

STEPS = 16


def command(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "herd.train", *small_overrides(data_dir), f"hydra.run.dir={run_dir}",
            f"paths.log_dir={run_dir.parent}", f"trainer.max_steps={STEPS}", "trainer.precision=32-true",
            "trainer.deterministic=true", "trainer.log_every_n_steps=1", "trainer.val_check_interval=8",
            "callbacks.last_checkpoint.every_n_train_steps=4", "callbacks.text_samples=null", "logger=csv",
            "validate_first=false", "export=false", *extra]


def logged_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")}


@pytest.mark.slow
def test_sigkill_then_resume_continues_the_same_loss_curve(tmp_path, prepared_corpus):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full = tmp_path / "full"
    subprocess.run(command(prepared_corpus, full), check=True, env=env, capture_output=True, timeout=600)
    reference = logged_losses(full)
    assert len(reference) == STEPS

    killed = tmp_path / "killed"
    last = killed / "checkpoints" / "last.ckpt"
    start_then_kill(command(prepared_corpus, killed), env, last.exists)

    resumed = tmp_path / "resumed"
    result = subprocess.run(command(prepared_corpus, resumed, f"ckpt_path={last}"), env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    after = logged_losses(resumed)
    first_resumed_step = min(after)
    assert 4 <= first_resumed_step < STEPS  # it continued from a mid-run checkpoint, not from scratch
    assert sorted(after) == list(range(first_resumed_step, STEPS))
    for step, loss in after.items():
        assert loss == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_requeue_into_the_same_folder_continues_the_curve_with_one_row_per_step(tmp_path, prepared_corpus):
    """SIGKILL, then the same command again with resume=auto (as a SLURM requeue or torchrun restart does):
    the run continues from its own last.ckpt, metrics.csv keeps one row per step, checkpoint names stay."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reference_dir = tmp_path / "full"
    subprocess.run(command(prepared_corpus, reference_dir), check=True, env=env, capture_output=True, timeout=600)
    reference = logged_losses(reference_dir)

    run_dir = tmp_path / "requeued"
    requeue = command(prepared_corpus, run_dir, "resume=auto", "+logger.csv.flush_logs_every_n_steps=1")
    process = subprocess.Popen(requeue, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 600
    # kill after the step-8 checkpoint, once rows past it are on disk (they must not appear twice)
    while process.poll() is None and time.time() < deadline:
        steps = logged_losses(run_dir) if (run_dir / "csv" / "metrics.csv").exists() else {}
        if last.exists() and max(steps, default=-1) >= 9:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    assert max(logged_losses(run_dir)) < STEPS - 1

    result = subprocess.run(requeue, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resume=auto: continuing from {last} at step" in result.stdout
    assert "own folder" in result.stdout
    assert f"resumed from:     {last} (step 8)" in result.stdout  # the summary after a resume...
    assert "  val/loss " in result.stdout  # ...still reports the validation loss
    rows = [row for row in csv_rows(run_dir) if row.get("train/loss")]
    assert [int(row["step"]) for row in rows] == list(range(STEPS))  # no step lost, none twice
    for row in rows:
        assert float(row["train/loss"]) == pytest.approx(reference[int(row["step"])], rel=1e-5, abs=1e-6)
    val_steps = [int(row["step"]) for row in csv_rows(run_dir) if row.get("val/loss")]
    assert len(val_steps) == len(set(val_steps)) == 2
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "last.ckpt" in names and not any("-v" in name for name in names), names  # never last-v1.ckpt
    assert "resume=auto: continuing from" in (run_dir / "train.log").read_text()
