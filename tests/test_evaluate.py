"""python -m herd.evaluate: needle-in-a-haystack on an exported model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from herd.data.tokenizer import Tokenizer
from herd.evaluate import evaluate_needle
from herd.interop import hf
from herd.model import ModelConfig, Transformer
from herd.presets import config_dir
from training import TRAIN_VOCAB


def exported_model(tmp_path, prepared_corpus):
    model_dir = tmp_path / "model"
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=TRAIN_VOCAB))
    hf.save(model, model_dir, tokenizer=Tokenizer.load(prepared_corpus / "tokenizer"))
    return model_dir


def test_needle_evaluation_of_an_exported_model(tmp_path, prepared_corpus):
    model_dir = exported_model(tmp_path, prepared_corpus)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"model_dir={model_dir}", f"data_dir={prepared_corpus}",
                                             "lengths=[128,256]", "depths=[0.0,1.0]", "trials=2"])
    result = evaluate_needle(cfg)
    assert result.accuracy.shape == (2, 2) and result.lengths == [128, 256]
    assert result.mean <= 0.25  # an untrained model does not retrieve 5-digit keys


def test_needle_evaluation_with_fp8_feed_forward_layers(tmp_path, prepared_corpus):
    model_dir = tmp_path / "model"
    model = Transformer(ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=TRAIN_VOCAB))
    hf.save(model, model_dir, tokenizer=Tokenizer.load(prepared_corpus / "tokenizer"))
    overrides = [f"model_dir={model_dir}", f"data_dir={prepared_corpus}", "lengths=[128]", "depths=[0.5]",
                 "trials=1"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("evaluate", overrides=[*overrides, "quantize=fp8_rowwise"])
        bad = compose("evaluate", overrides=[*overrides, "quantize=nf4"])
    assert evaluate_needle(cfg).accuracy.shape == (1, 1)
    with pytest.raises(ValueError, match="quantize='nf4' is not a quantization method"):
        evaluate_needle(bad)


def test_command_line_writes_the_table(tmp_path, prepared_corpus):
    model_dir = exported_model(tmp_path, prepared_corpus)
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "herd.evaluate", f"model_dir={model_dir}", f"data_dir={prepared_corpus}",
                          "lengths=[128]", "depths=[0.5]", "trials=1", f"hydra.run.dir={run}"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    saved = json.loads((run / "needle.json").read_text())
    assert saved["lengths"] == [128] and np.array(saved["accuracy"]).shape == (1, 1)
    assert "depth \\ length" in out.stdout
