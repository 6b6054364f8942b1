"""DDP on two CPU processes (gloo), launched the way users launch it: from the command line."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from helpers.training import small_overrides


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_trains_and_logs_once(tmp_path, prepared_corpus):
    run_dir = tmp_path / "logs" / "ddp"
    cmd = [sys.executable, "-m", "herd.train", *small_overrides(prepared_corpus), "strategy=ddp",
           "trainer.devices=2", "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1",
           "callbacks.text_samples=null", "logger=many", f"hydra.run.dir={run_dir}", f"paths.log_dir={tmp_path / 'logs'}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "world_size: 2" in result.stderr + result.stdout or "Initializing distributed: GLOBAL_RANK: 1" in (
        result.stderr + result.stdout)
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == list(range(6))
    # Two ranks of 8 rows of 64 tokens each step.
    tokens = [float(r["train/tokens_seen"]) for r in rows if r.get("train/tokens_seen")]
    assert tokens[-1] == 6 * 2 * 8 * 64
    assert (run_dir / "export" / "model.safetensors").is_file()
    assert len(list((tmp_path / "logs").iterdir())) == 1  # one run folder for both ranks
