"""Logits parity with transformers.LlamaForCausalLM, and load/save of Hugging Face directories."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from helpers.synthetic import write_word_level_tokenizer
from herd.interop import hf
from herd.model import ModelConfig, Transformer

ATOL = 1e-4


def hf_config(**overrides) -> LlamaConfig:
    values = dict(vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                  tie_word_embeddings=False)
    values.update(overrides)
    return LlamaConfig(**values)


def reference_model(config: LlamaConfig, path) -> LlamaForCausalLM:
    """A randomly initialised transformers Llama, saved to ``path`` and reloaded in eager fp32."""
    torch.manual_seed(1)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # transformers initialises norms to 1; randomise them so they are checked
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def assert_same_logits(herd_model: Transformer, reference: LlamaForCausalLM, seq: int = 48) -> None:
    tokens = torch.randint(0, herd_model.config.vocab_size, (2, seq))
    with torch.no_grad():
        expected = reference(tokens).logits
        got = herd_model(tokens)
    assert got.shape == expected.shape == (2, seq, herd_model.config.vocab_size)
    assert (got - expected).abs().max().item() <= ATOL


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_loaded_hf_directory_matches_transformers_logits_with_gqa(tmp_path, tied):
    reference = reference_model(hf_config(tie_word_embeddings=tied), tmp_path)
    model = hf.load(tmp_path)
    assert model.config.n_kv_heads == 2 and model.config.n_heads == 8
    assert model.config.tie_embeddings is tied
    assert (model.output.weight is model.tok_embeddings.weight) is tied
    assert_same_logits(model, reference)


def test_llama3_rope_scaling_matches_beyond_original_context(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 100.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    reference = reference_model(hf_config(rope_parameters=rope), tmp_path)
    model = hf.load(tmp_path)
    assert model.config.rope_scaling is not None and model.config.rope_scaling.original_max_position_embeddings == 32
    # head_dim 8, theta 100 -> wavelengths 6.3 (kept), 19.9 (blended), 63 and 199 (divided by 8);
    # 160 positions reach well past the original 32.
    assert_same_logits(model, reference, seq=160)


def test_llama3_rope_scaling_changes_the_frequencies():
    base = ModelConfig(dim=64, n_heads=4, rope_theta=10000.0)
    scaled = ModelConfig(dim=64, n_heads=4, rope_theta=10000.0, rope_scaling={"original_max_position_embeddings": 32})
    a, b = Transformer(base).rope.inv_freq, Transformer(scaled).rope.inv_freq
    assert a[0] == b[0]  # highest frequency untouched
    assert torch.isclose(b[-1], a[-1] / 8)  # lowest divided by the factor


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_saved_herd_model_loads_in_transformers_with_same_logits(tmp_path, small_config, tied):
    config = ModelConfig(**{**small_config.to_dict(), "tie_embeddings": tied,
                            "rope_scaling": {"original_max_position_embeddings": 16}})
    model = Transformer(config).eval()
    hf.save(model, tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    assert reference.config.tie_word_embeddings is tied
    assert_same_logits(model, reference.eval(), seq=64)
    reloaded = hf.load(tmp_path)
    shape_fields = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim", "norm_eps",
                    "rope_theta", "rope_scaling", "max_seq_len", "tie_embeddings")
    assert {f: getattr(reloaded.config, f) for f in shape_fields} == {f: getattr(config, f) for f in shape_fields}
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_sharded_save_writes_an_index_and_loads_both_ways(tmp_path, small_config):
    model = Transformer(small_config).eval()
    hf.save(model, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / hf.SAFETENSORS_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / hf.SAFETENSORS_FILE).exists()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    assert_same_logits(model, reference.eval())
    assert_same_logits(hf.load(tmp_path), reference.eval())


def test_save_copies_a_tokenizer_directory_and_records_bos_eos(tmp_path, small_config):
    tok_dir = tmp_path / "tok"
    write_word_level_tokenizer(tok_dir, 92, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})
    out = hf.save(Transformer(small_config), tmp_path / "model", tokenizer=tok_dir)
    assert (out / "tokenizer.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["bos_token_id"] == 90 and config["eos_token_id"] == 91


def test_save_refuses_a_tokenizer_larger_than_the_vocabulary_before_writing(tmp_path, small_config):
    write_word_level_tokenizer(tmp_path / "tok", 500, {"bos_token": "<|begin_of_text|>"})
    out = tmp_path / "model"
    with pytest.raises(hf.CheckpointError, match=rf"tok has 500 ids but the model's vocab_size is {small_config.vocab_size}"):
        hf.save(Transformer(small_config), out, tokenizer=tmp_path / "tok")
    assert not out.exists()
    out.mkdir()
    with pytest.raises(hf.CheckpointError, match="500 ids"):
        hf.save(Transformer(small_config), out, tokenizer=str(tmp_path / "tok"))
    assert list(out.iterdir()) == []


def test_save_refuses_a_tokenizer_object_larger_than_the_vocabulary(tmp_path, small_config):
    from transformers import PreTrainedTokenizerFast

    tok = write_word_level_tokenizer(tmp_path / "tok", 500)
    out = tmp_path / "model"
    with pytest.raises(hf.CheckpointError, match=rf"has 500 ids but the model.s vocab_size is {small_config.vocab_size}"):
        hf.save(Transformer(small_config), out, tokenizer=PreTrainedTokenizerFast(tokenizer_object=tok))
    assert not out.exists()


def test_save_accepts_a_tokenizer_that_fills_the_vocabulary_exactly(tmp_path, small_config):
    write_word_level_tokenizer(tmp_path / "tok", small_config.vocab_size, {"eos_token": "<|end_of_text|>"})
    out = hf.save(Transformer(small_config), tmp_path / "model", tokenizer=tmp_path / "tok")
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == small_config.vocab_size - 1
    hf.load(out)


def test_tokenizer_folder_without_config_gets_herds_bos_eos(tmp_path):
    from transformers import AutoTokenizer

    from herd.data.tokenizer import train_tokenizer

    trained = train_tokenizer(["def f(x):\n    return x + 1\n", "A docstring, in prose."] * 20, vocab_size=520)
    source = trained.save(tmp_path / "tok")
    (source / "tokenizer_config.json").unlink()
    config = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=trained.vocab_size, multiple_of=16)
    out = hf.save(Transformer(config), tmp_path / "model", tokenizer=source)

    assert not (source / "tokenizer_config.json").exists()  # the source folder is left as it was
    saved = json.loads((out / "config.json").read_text())
    assert (saved["bos_token_id"], saved["eos_token_id"]) == (trained.bos_id, trained.eos_id)
    loaded = AutoTokenizer.from_pretrained(out)
    assert (loaded.bos_token, loaded.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    assert (loaded.bos_token_id, loaded.eos_token_id) == (trained.bos_id, trained.eos_id)
    assert loaded("def f")["input_ids"][0] == trained.bos_id
    assert hf.load(out).config.vocab_size == trained.vocab_size


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002], ids=lambda umask: f"umask{umask:03o}")
@pytest.mark.parametrize("max_shard_bytes", [None, 40_000], ids=["single", "sharded"])
def test_exported_files_all_get_the_umask_mode(tmp_path, small_config, umask, max_shard_bytes):
    write_word_level_tokenizer(tmp_path / "tok", 92, {"bos_token": "<|begin_of_text|>"})
    (tmp_path / "tok" / "tokenizer.json").chmod(0o600)  # the copy does not inherit the source's mode
    previous = os.umask(umask)
    try:
        kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
        out = hf.save(Transformer(small_config), tmp_path / "model", tokenizer=tmp_path / "tok", **kwargs)
    finally:
        os.umask(previous)
    weights = sorted(out.glob("*.safetensors"))
    assert len(weights) == (1 if max_shard_bytes is None else len(set(
        json.loads((out / hf.SAFETENSORS_INDEX).read_text())["weight_map"].values())))
    modes = {file.name: oct(stat.S_IMODE(file.stat().st_mode)) for file in out.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(modes)
    assert modes == dict.fromkeys(modes, oct(0o666 & ~umask))


def test_load_converts_dtype(tmp_path, small_config):
    hf.save(Transformer(small_config), tmp_path)
    model = hf.load(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rope.inv_freq.dtype == torch.float32


# --------------------------------------------------------------------------- bad checkpoints


@pytest.fixture
def saved(tmp_path, small_config):
    hf.save(Transformer(small_config), tmp_path)
    return tmp_path


def test_missing_tensor_is_named(saved):
    state = load_file(saved / hf.SAFETENSORS_FILE)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, saved / hf.SAFETENSORS_FILE)
    with pytest.raises(hf.CheckpointError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"):
        hf.load(saved)


def test_wrong_shape_is_named(saved):
    state = load_file(saved / hf.SAFETENSORS_FILE)
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)
    save_file(state, saved / hf.SAFETENSORS_FILE)
    with pytest.raises(hf.CheckpointError, match=r"k_proj\.weight' has shape \(8, 64\)"):
        hf.load(saved)


def test_unexpected_tensor_is_named(saved):
    state = load_file(saved / hf.SAFETENSORS_FILE)
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    state["model.layers.7.mlp.up_proj.weight"] = torch.ones(1)
    save_file(state, saved / hf.SAFETENSORS_FILE)
    with pytest.raises(hf.CheckpointError, match="q_norm"):
        hf.load(saved)


def test_pickled_weights_are_refused_not_loaded(saved):
    (saved / hf.SAFETENSORS_FILE).rename(saved / "pytorch_model.bin")
    with pytest.raises(hf.CheckpointError, match="never unpickles"):
        hf.load(saved)


def test_corrupt_safetensors_names_the_file(saved):
    (saved / hf.SAFETENSORS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(hf.CheckpointError, match="model.safetensors is not a readable safetensors file"):
        hf.load(saved)


def test_missing_config_and_wrong_architecture(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(hf.CheckpointError, match="model_type is 'mistral'"):
        hf.load(saved)
    (saved / "config.json").unlink()
    with pytest.raises(hf.CheckpointError, match="config.json does not exist"):
        hf.load(saved)


def test_tokenizer_larger_than_the_embedding_is_refused(saved, small_config):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({f"w{i}": i for i in range(500)}, unk_token="w0")).save(str(saved / "tokenizer.json"))
    with pytest.raises(hf.CheckpointError, match=rf"500 tokens but config.json's vocab_size is {small_config.vocab_size}"):
        hf.load(saved)


def test_index_naming_a_missing_shard(tmp_path, small_config):
    hf.save(Transformer(small_config), tmp_path, max_shard_bytes=40_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(hf.CheckpointError, match=shard.name):
        hf.load(tmp_path)
