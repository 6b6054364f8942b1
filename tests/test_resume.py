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

from training import small_overrides

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
    process = subprocess.Popen(command(prepared_corpus, killed), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 600
    while not last.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"

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
