"""The adapter stages (vision, speech) under DDP and FSDP2 on two CPU processes (gloo): they train, the backbone
stays, they export."""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import pytest
import torch

from helpers.training import TRAIN_VOCAB
from herd.interop import hf, mllama
from herd.interop import speech as speech_io
from herd.model import ModelConfig, Transformer
from herd.presets import model_preset

SHAPE = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": TRAIN_VOCAB}
ADAPTERS = {  # experiment: (data fixture, its own overrides, how its export loads)
    "tiny_vision": ("prepared_images", ["stage.caption_examples=4", "stage.max_caption_tokens=4"], mllama.load_vision),
    "tiny_speech": ("prepared_speech", ["stage.transcribe_examples=4", "stage.max_transcript_tokens=4"],
                    speech_io.load_speech),
}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("experiment", sorted(ADAPTERS))
def test_adapter_stage_on_two_processes(tmp_path, prepared_corpus, experiment, strategy, request):
    fixture, own, load = ADAPTERS[experiment]
    data = request.getfixturevalue(fixture)
    config = ModelConfig.from_dict({**model_preset("tiny").to_dict(), **SHAPE})  # head_dim derived again
    start = hf.save(Transformer(config), tmp_path / "start", tokenizer=prepared_corpus / "tokenizer")
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "herd.train", f"experiment={experiment}", f"stage.init_from={start}",
               *(f"model.{key}={value}" for key, value in SHAPE.items()), f"data.data_dir={data}",
               "data.batch_size=4", "data.num_workers=0", f"strategy={strategy}", "trainer.devices=2",
               "trainer.max_steps=2", "trainer.log_every_n_steps=1", "trainer.limit_val_batches=1",
               *own, "validate_first=false", "logger=csv",
               "callbacks.progress_bar=null", "trainer.enable_progress_bar=false",
               "trainer.enable_model_summary=false", f"hydra.run.dir={run_dir}", f"paths.log_dir={tmp_path}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("train/loss")]
    assert len(rows) == 2 and all(math.isfinite(float(row["train/loss"])) for row in rows)
    exported = load(run_dir / "export")
    before = hf.load(start)
    for name, tensor in before.state_dict().items():
        assert torch.equal(exported.backbone.state_dict()[name], tensor), name
