"""Speech model directories: a Llama directory transformers loads, with the speech adapter beside it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from herd.interop import speech as speech_io
from herd.interop.hf import CheckpointError
from herd.model import ModelConfig, Transformer
from herd.model.speech import SpeechConfig, SpeechLanguageModel


def speech_model() -> SpeechLanguageModel:
    torch.manual_seed(0)
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=128)
    speech = SpeechConfig(dim=32, n_layers=2, n_heads=4, ffn_dim=64, adapter_dim=48, adapter_heads=4,
                          adapter_ffn_dim=64)
    return SpeechLanguageModel(Transformer(config), speech).eval()


def inputs():
    tokens = torch.tensor([[5, 6, 0, 0, 0, 0, 7, 8]])
    mask = torch.tensor([[False, False, True, True, True, True, False, False]])
    return tokens, torch.randn(1, 80, 32), torch.tensor([32]), mask  # 32 mel frames: 4 adapter frames


def test_the_export_round_trips_and_transformers_loads_the_language_model(tmp_path):
    model = speech_model()
    out = speech_io.save_speech(model, tmp_path / "export")
    assert speech_io.is_speech_model(out) and (out / "config.json").is_file()
    meta = json.loads((out / speech_io.ADAPTER_CONFIG).read_text())
    assert meta["special_tokens"] == {"speech_start": "<|reserved_special_token_10|>",
                                      "speech_end": "<|reserved_special_token_11|>"}
    assert meta["features"]["n_mels"] == 80 and meta["speech"]["adapter_dim"] == 48
    loaded = speech_io.load_speech(out).eval()
    args = inputs()
    assert torch.equal(loaded(*args), model(*args))
    hf_model = LlamaForCausalLM.from_pretrained(out).eval()
    tokens = args[0]
    torch.testing.assert_close(hf_model(tokens).logits, model.backbone(tokens), atol=1e-4, rtol=1e-4)


def test_a_damaged_adapter_is_refused_naming_the_tensor(tmp_path):
    out = speech_io.save_speech(speech_model(), tmp_path / "export")
    weights = load_file(out / speech_io.ADAPTER_WEIGHTS)
    weights["adapter.output.weight"] = torch.zeros(3, 3)
    save_file(weights, out / speech_io.ADAPTER_WEIGHTS)
    with pytest.raises(CheckpointError, match=r"adapter.output.weight has shape \(3, 3\)"):
        speech_io.load_speech(out)
    del weights["adapter.output.weight"]
    save_file(weights, out / speech_io.ADAPTER_WEIGHTS)
    with pytest.raises(CheckpointError, match="lacks 1 adapter tensor"):
        speech_io.load_speech(out)
    (out / speech_io.ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(CheckpointError, match="speech_adapter.json is not valid JSON"):
        speech_io.load_speech(out)
