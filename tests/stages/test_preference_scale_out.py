"""stage=reward and stage=dpo (live reference) under FSDP2 on two CPU processes (gloo)."""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import pytest
import torch

from helpers.training import PREFERENCE_SEQ_LEN, TRAIN_VOCAB
from herd.interop import hf
from herd.model import ModelConfig, Transformer
from herd.presets import model_preset

SHAPE = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": TRAIN_VOCAB}


def _run(tmp_path, prepared_corpus, prepared_preferences, stage, *overrides):
    config = ModelConfig.from_dict({**model_preset("tiny").to_dict(), **SHAPE})  # head_dim derived again  # the shape the command line composes
    start = hf.save(Transformer(config), tmp_path / "start", tokenizer=prepared_corpus / "tokenizer")
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "herd.train", f"stage={stage}", f"stage.init_from={start}",
               *(f"model.{key}={value}" for key, value in SHAPE.items()), f"data.data_dir={prepared_preferences}",
               "data.sources=null", f"data.seq_len={PREFERENCE_SEQ_LEN}", "data.batch_size=2", "data.num_workers=0",
               "strategy=fsdp2", "trainer.devices=2", "trainer.max_steps=2", "trainer.precision=32-true",
               "trainer.log_every_n_steps=1", "trainer.limit_val_batches=1", "validate_first=false", "logger=csv",
               "callbacks.text_samples=null", "callbacks.progress_bar=null", "trainer.enable_progress_bar=false",
               "trainer.enable_model_summary=false", f"hydra.run.dir={run_dir}", f"paths.log_dir={tmp_path}",
               *overrides]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("train/loss")]
    return run_dir, rows


@pytest.mark.slow
def test_reward_under_fsdp2_exports_a_reward_model(tmp_path, prepared_corpus, prepared_preferences):
    run_dir, rows = _run(tmp_path, prepared_corpus, prepared_preferences, "reward", "stage.optimizer.lr=1e-3")
    assert len(rows) == 2 and all(math.isfinite(float(row["train/loss"])) for row in rows)
    model = hf.load_reward_model(run_dir / "export")
    assert model.head.weight.shape == (1, SHAPE["dim"]) and torch.isfinite(model.head.weight).all()


@pytest.mark.slow
def test_dpo_with_a_live_reference_under_fsdp2_starts_at_ln_2(tmp_path, prepared_corpus, prepared_preferences):
    _, rows = _run(tmp_path, prepared_corpus, prepared_preferences, "dpo", "stage.reference=live",
                   "stage.nll_weight=0.0", "stage.optimizer.lr=1e-3")
    # at the first step the sharded policy and the sharded frozen copy are the same model
    assert float(rows[0]["train/loss"]) == pytest.approx(math.log(2), abs=1e-5)
    assert float(rows[0]["train/rewards/margin"]) == pytest.approx(0.0, abs=1e-5)
