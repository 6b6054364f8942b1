"""GGUF files in: herd's model from a tiny llama.cpp-style GGUF against transformers' GGUF loader, the
cache, herd.export with a .gguf checkpoint, and the one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("gguf", reason="GGUF support is the optional extra herd[gguf]")

import gguf as gguf_package  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # noqa: E402

from helpers.gguf_files import llama3_rope_factors, random_llama, tiny_tokenizer, write_llama_gguf  # noqa: E402
from herd.data.chat import render_dialog  # noqa: E402
from herd.data.tokenizer import Tokenizer  # noqa: E402
from herd.export import export  # noqa: E402
from herd.interop import gguf, hf  # noqa: E402

ATOL = 1e-5
VOCAB = 600


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Every test converts into its own cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return tiny_tokenizer(VOCAB)


def transformers_from_gguf(path) -> LlamaForCausalLM:
    """transformers' own reading of the file (its GGUF loader, without accelerate), eager fp32."""
    values = load_gguf_checkpoint(str(path))["config"]
    config = LlamaConfig(**{k: v for k, v in values.items() if k not in ("_model_name_or_path", "model_type")})
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config)
    state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.eval()


def max_difference(herd_model, reference, seq: int = 40) -> float:
    tokens = torch.randint(0, VOCAB, (2, seq))
    with torch.no_grad():
        return (herd_model(tokens) - reference(tokens).logits).abs().max().item()


@pytest.mark.parametrize(("tensor_type", "tied"), [("F32", False), ("F32", True), ("F16", False), ("Q8_0", True)])
def test_herd_reads_a_gguf_with_the_logits_of_transformers_gguf_loader(tmp_path, tokenizer, tensor_type, tied):
    original = random_llama(tie=tied)
    path = write_llama_gguf(tmp_path / "tiny.gguf", original, tokenizer, tensor_type=tensor_type)
    model = hf.load(gguf.model_dir(path))
    assert model.config.tie_embeddings is tied and model.config.n_kv_heads == 2
    assert max_difference(model, transformers_from_gguf(path)) <= ATOL
    if tensor_type == "F32":  # lossless: llama.cpp's permutation of wq/wk is undone exactly
        assert max_difference(model, original) <= ATOL


def test_conversion_happens_once_per_file_content(tmp_path, tokenizer, monkeypatch):
    path = write_llama_gguf(tmp_path / "a.gguf", random_llama(), tokenizer)
    first = gguf.model_dir(path)
    assert sorted(p.name for p in first.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "gguf_source.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((first / gguf.SOURCE_FILE).read_text())["gguf_file"] == str(path.resolve())
    copy = tmp_path / "copy" / "A.GGUF"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    with monkeypatch.context() as patch:
        patch.setattr(gguf, "convert", no_conversion)
        assert gguf.model_dir(str(path)) == first
        assert gguf.model_dir(copy) == first  # the key is the content, not the name
    other = gguf.model_dir(write_llama_gguf(tmp_path / "b.gguf", random_llama(seed=2), tokenizer))
    assert other != first and other.parent == first.parent == tmp_path / "cache" / "herd" / "gguf"
    assert not [p.name for p in first.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert gguf.model_dir(first) == first and gguf.model_dir(tmp_path / "x") == tmp_path / "x"  # others unchanged


def test_the_tokenizer_keeps_the_files_ids_tokens_and_chat_template(tmp_path, tokenizer):
    directory = gguf.model_dir(write_llama_gguf(tmp_path / "tiny.gguf", random_llama(), tokenizer))
    converted = Tokenizer.load(directory)
    assert converted.vocab_size == VOCAB  # transformers' extra <|endoftext|> (no embedding row) is left out
    assert converted.special_ids == tokenizer.special_ids
    text = "the value of a list is read from the file"
    assert converted.encode(text) == tokenizer.encode(text)
    messages = [{"role": "user", "content": "What is a tuple?"}]
    rendered = AutoTokenizer.from_pretrained(directory).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert rendered == render_dialog(messages, add_generation_prompt=True)
    config = json.loads((directory / "config.json").read_text())
    generation = json.loads((directory / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (tokenizer.bos_id, tokenizer.special_id("eot_id"))
    assert generation["eos_token_id"] == tokenizer.special_id("eot_id")


def test_generate_and_a_stage_accept_a_gguf_file(tmp_path, tokenizer):
    from herd.inference import load
    from herd.stages.pretrain import PretrainStage

    path = write_llama_gguf(tmp_path / "tiny.gguf", random_llama(), tokenizer)
    loaded = load(str(path))
    assert loaded.tokenizer.vocab_size == loaded.model.config.vocab_size == VOCAB
    stage = PretrainStage(init_from=str(path))
    assert stage.init_from == str(gguf.model_dir(path))
    stage.configure_model()
    assert max_difference(stage.model.eval(), transformers_from_gguf(path)) <= ATOL


def test_export_of_a_gguf_is_a_directory_transformers_loads_with_the_same_logits(tmp_path, tokenizer):
    path = write_llama_gguf(tmp_path / "tiny.gguf", random_llama(tie=True), tokenizer, tensor_type="F16")
    out = export(path, tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    reference = transformers_from_gguf(path)
    tokens = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        assert (exported(tokens).logits - reference(tokens).logits).abs().max().item() <= ATOL
    assert (out / "chat_template.jinja").is_file() and (out / "generation_config.json").is_file()
    assert AutoTokenizer.from_pretrained(out).encode("a list", add_special_tokens=False) == tokenizer.encode("a list")


def test_llama3_rope_scaling_is_read_from_rope_freqs(tmp_path, tokenizer):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    original = random_llama(rope_parameters=rope)
    # head_dim 8, theta 5e5: wavelengths 6.3 and 167 (kept), 4443 (blended) and 118140 (divided by 8)
    factors = llama3_rope_factors(8, 500000.0, factor=8.0)
    path = write_llama_gguf(tmp_path / "tiny.gguf", original, tokenizer, rope_freqs=factors)
    model = hf.load(gguf.model_dir(path))
    assert model.config.rope_scaling is not None and model.config.rope_scaling.factor == pytest.approx(8.0)
    assert max_difference(model, original, seq=200) <= ATOL

    weird = np.linspace(1.0, 3.0, 4, dtype=np.float32)
    with pytest.raises(gguf.GGUFError, match="rope_freqs.weight .* is not Llama 3's RoPE scaling"):
        gguf.model_dir(write_llama_gguf(tmp_path / "weird.gguf", original, tokenizer, rope_freqs=weird))


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_errors_are_one_line_with_the_fix(tmp_path, tokenizer, monkeypatch):
    with pytest.raises(FileNotFoundError) as missing:
        gguf.model_dir(tmp_path / "absent.gguf")
    assert "absent.gguf does not exist" in _one_line(missing)

    (tmp_path / "text.gguf").write_text("not a model\n")
    with pytest.raises(gguf.GGUFError) as not_gguf:
        gguf.model_dir(tmp_path / "text.gguf")
    assert "is not a GGUF file" in _one_line(not_gguf)

    writer = gguf_package.GGUFWriter(str(tmp_path / "qwen.gguf"), "qwen2")
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(gguf.GGUFError) as qwen:
        gguf.model_dir(tmp_path / "qwen.gguf")
    assert "general.architecture is 'qwen2'; herd loads Llama GGUF files ('llama') only" in _one_line(qwen)

    path = write_llama_gguf(tmp_path / "tiny.gguf", random_llama(), tokenizer)
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the extra were not installed
    with pytest.raises(ImportError) as no_package:
        gguf.model_dir(path)
    assert "pip install 'herd[gguf]'" in _one_line(no_package)
    assert isinstance(no_package.value, gguf.GGUFError)  # so every command prints it as one line
    assert not (tmp_path / "cache" / "herd" / "gguf").exists() or not any(
        p.name.startswith(".") for p in (tmp_path / "cache" / "herd" / "gguf").iterdir())


@pytest.mark.slow
def test_export_command_converts_a_gguf_and_refuses_another_architecture(tmp_path, tokenizer):
    path = write_llama_gguf(tmp_path / "tiny.gguf", random_llama(), tokenizer)
    writer = gguf_package.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    def run(checkpoint):
        command = [sys.executable, "-m", "herd.export", f"checkpoint={checkpoint}", f"output={tmp_path / 'out'}",
                   "dtype=bf16", f"hydra.run.dir={tmp_path / 'hydra'}"]
        return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)

    done = run(path)
    assert done.returncode == 0, done.stderr
    assert f"herd.export: wrote {tmp_path / 'out'}" in done.stdout
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    refused = run(tmp_path / "phi.gguf")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"herd.export: {tmp_path / 'phi.gguf'}: general.architecture is 'phi3'; herd loads Llama GGUF files "
        "('llama') only")
