"""Llama-family config.json files (Llama 2/3.x, Code Llama, SmolLM, Yi, ...): transformers' logits,
both ways, for every RoPE type, biases, a pinned head_dim and odd vocabularies; and the refusals."""

from __future__ import annotations

import json
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from herd.interop import hf
from herd.model import Transformer

ATOL = 1e-5  # fp32, tiny random models
SEQ = 48  # past the original 32 positions of the scaled RoPE types
HALF = 8  # head_dim 16 -> 8 frequencies


def llama_json(**overrides) -> dict:
    """A tiny Llama 2 style config.json (transformers 4.x keys: rope_theta + rope_scaling)."""
    values = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": 101, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1, "bos_token_id": 1, "eos_token_id": 2,
    }
    values.update(overrides)
    return values


def reference_model(config_json: dict, path) -> LlamaForCausalLM:
    """A random transformers Llama whose directory holds exactly ``config_json``, reloaded in eager fp32.

    Norm gains and biases are randomised (transformers starts them at 1 and 0) so they are checked.
    """
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig.from_dict(dict(config_json)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    (path / "config.json").write_text(json.dumps(config_json))  # what herd reads is the file as given
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def logits_difference(model: Transformer, reference: LlamaForCausalLM, seq: int = SEQ) -> float:
    tokens = torch.randint(0, model.config.vocab_size, (2, seq))
    with torch.no_grad():
        expected = reference(tokens).logits
        got = model(tokens)
    assert got.shape == expected.shape == (2, seq, model.config.vocab_size)
    return (got - expected).abs().max().item()


def exported(model: Transformer, path) -> LlamaForCausalLM:
    hf.save(model, path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def assert_same_weights(a: Transformer, b: Transformer) -> None:
    for (name, x), (other, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert name == other and torch.equal(x, y), name


def test_llama2_style_config_json_matches_transformers_both_ways(tmp_path):
    config_json = llama_json(vocab_size=32000)  # rope_theta 1e4, no rope_scaling, pretraining_tp 1
    reference = reference_model(config_json, tmp_path / "in")
    model = hf.load(tmp_path / "in")
    assert model.config.rope_theta == 10000.0 and model.config.rope_scaling is None
    assert logits_difference(model, reference) <= ATOL
    assert logits_difference(model, exported(model, tmp_path / "out")) <= ATOL
    assert hf.read_config(tmp_path / "out") == model.config


ROPES = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "yarn_mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 16,
                    "beta_slow": 2, "mscale": 0.8, "mscale_all_dim": 0.5, "truncate": False},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 32,
                 "short_factor": [1.0 + 0.1 * i for i in range(HALF)],
                 "long_factor": [1.0 + 0.7 * i for i in range(HALF)]},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
}


@pytest.mark.parametrize("name", list(ROPES))
def test_every_rope_type_matches_transformers_and_exports_the_same_rope_parameters(tmp_path, name):
    rope = {**ROPES[name], "rope_theta": 100.0}
    # dynamic NTK grows theta past max_position_embeddings, the others read original_max_position_embeddings
    config_json = llama_json(rope_parameters=rope, rope_scaling=None, max_position_embeddings=32 if name == "dynamic"
                             else 128)
    reference = reference_model(config_json, tmp_path / "in")
    model = hf.load(tmp_path / "in")
    assert model.config.rope_theta == 100.0
    assert (model.config.rope_scaling is None) is (name == "default")
    assert logits_difference(model, reference) <= ATOL
    if name != "default":  # the scaling matters at this size: plain RoPE is far off
        plain = hf.load(tmp_path / "in")
        plain.set_context(rope_scaling=None)
        assert logits_difference(plain, reference) > 1e-3
    out = exported(model, tmp_path / "out")
    assert logits_difference(model, out) <= ATOL
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    expected = {**rope, "factor": 4.0} if name == "longrope" else rope  # transformers' default factor: 128 / 32
    assert written["rope_parameters"] == expected
    assert written["max_position_embeddings"] == config_json["max_position_embeddings"]
    assert hf.read_config(tmp_path / "out") == model.config


@pytest.mark.parametrize("rope_scaling", [{"type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0}],
                         ids=["linear", "dynamic"])
def test_transformers_4_rope_scaling_with_type_key_matches(tmp_path, rope_scaling):
    reference = reference_model(llama_json(rope_theta=100.0, rope_scaling=rope_scaling, max_position_embeddings=32),
                                tmp_path)
    model = hf.load(tmp_path)
    assert model.config.rope_scaling.rope_type == rope_scaling["type"]
    assert logits_difference(model, reference) <= ATOL


@pytest.mark.parametrize(("attention_bias", "mlp_bias"), [(True, False), (False, True), (True, True)],
                         ids=["attention", "mlp", "both"])
def test_biases_load_and_save_with_transformers_logits(tmp_path, attention_bias, mlp_bias):
    reference = reference_model(llama_json(attention_bias=attention_bias, mlp_bias=mlp_bias), tmp_path / "in")
    model = hf.load(tmp_path / "in")
    assert (model.config.attention_bias, model.config.mlp_bias) == (attention_bias, mlp_bias)
    assert (model.layers[1].attention.wo.bias is not None) is attention_bias
    assert (model.layers[1].feed_forward.w2.bias is not None) is mlp_bias
    assert logits_difference(model, reference) <= ATOL
    assert logits_difference(model, exported(model, tmp_path / "out")) <= ATOL
    assert_same_weights(model, hf.load(tmp_path / "out"))


def test_bias_tensor_the_config_does_not_announce_is_named(tmp_path):
    reference_model(llama_json(attention_bias=True), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(llama_json(attention_bias=False)))
    with pytest.raises(hf.CheckpointError, match=r"_proj\.bias' does not fit config.json \(attention_bias is false"):
        hf.load(tmp_path)


def test_head_dim_other_than_hidden_over_heads_matches_transformers(tmp_path):
    reference = reference_model(llama_json(head_dim=32), tmp_path / "in")  # 4 heads x 32 = 128 != 64
    model = hf.load(tmp_path / "in")
    assert model.config.head_dim == 32 and model.layers[0].attention.wq.weight.shape == (128, 64)
    assert logits_difference(model, reference) <= ATOL
    assert logits_difference(model, exported(model, tmp_path / "out")) <= ATOL
    assert json.loads((tmp_path / "out" / "config.json").read_text())["head_dim"] == 32


@pytest.mark.parametrize(("vocab_size", "tied"), [(32001, False), (49152, True)], ids=["32001", "49152-tied"])
def test_odd_vocabulary_sizes_match_transformers_both_ways(tmp_path, vocab_size, tied):
    reference = reference_model(llama_json(vocab_size=vocab_size, tie_word_embeddings=tied), tmp_path / "in")
    model = hf.load(tmp_path / "in")
    assert model.config.vocab_size == vocab_size and model.config.tie_embeddings is tied
    assert logits_difference(model, reference, seq=16) <= ATOL
    assert logits_difference(model, exported(model, tmp_path / "out"), seq=16) <= ATOL


def test_everything_at_once_matches_transformers(tmp_path):
    """Biases, a pinned head_dim, yarn, tied embeddings and an odd vocabulary in one model."""
    rope = {"rope_type": "yarn", "rope_theta": 1000.0, "factor": 2.0, "original_max_position_embeddings": 32}
    config_json = llama_json(vocab_size=1001, head_dim=8, num_attention_heads=8, num_key_value_heads=2,
                             attention_bias=True, mlp_bias=True, tie_word_embeddings=True, rope_parameters=rope)
    reference = reference_model(config_json, tmp_path / "in")
    model = hf.load(tmp_path / "in")
    assert logits_difference(model, reference) <= ATOL
    assert logits_difference(model, exported(model, tmp_path / "out")) <= ATOL


def test_pretraining_tp_is_accepted_as_transformers_ignores_it():
    assert hf.config_from_hf(llama_json(pretraining_tp=2)) == hf.config_from_hf(llama_json())


def test_missing_keys_take_transformers_defaults():
    minimal = {k: v for k, v in llama_json().items() if k not in ("rms_norm_eps", "max_position_embeddings",
                                                                    "rope_theta", "rope_scaling")}
    config = hf.config_from_hf(minimal)
    defaults = LlamaConfig()
    assert config.norm_eps == defaults.rms_norm_eps and config.max_seq_len == defaults.max_position_embeddings
    assert config.rope_theta == defaults.rope_parameters["rope_theta"]


REFUSED = [
    ({"model_type": "mistral"}, "model_type is 'mistral'"),
    ({"architectures": ["MistralForCausalLM"]}, r"architectures \['MistralForCausalLM'\] is not one herd loads"),
    ({"sliding_window": 4096}, "sliding_window=4096"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"rope_scaling": {"type": "su", "factor": 2.0}}, r"rope_scaling\.rope_type='su' is not supported"),
    ({"rope_parameters": {"rope_type": "mrope", "rope_theta": 1e4}}, r"rope_parameters\.rope_type='mrope'"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "rope_parameters must be one mapping"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}},
     r"rope_parameters\.low_freq_factor is required by rope_type 'llama3'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 0.0}}, r"rope_parameters\.factor must be > 0"),
    ({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
     r"rope_parameters\.short_factor has 1 values; it needs one per frequency, head_dim / 2 = 8"),
    ({"attention_bias": "yes"}, "attention_bias must be true or false"),
    ({"hidden_size": 60, "num_attention_heads": 8}, "hidden_size=60 is not divisible by num_attention_heads=8"),
    ({"num_key_value_heads": 3}, "num_attention_heads=4 is not divisible by num_key_value_heads=3"),
    ({"head_dim": 7}, "head_dim=7 is odd"),
    ({"hidden_size": 24, "num_attention_heads": 8}, "head_dim=3 is odd"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer, got 0"),
    ({"vocab_size": "32000"}, "vocab_size must be a positive integer, got '32000'"),
    ({"num_hidden_layers": 1025}, "num_hidden_layers=1025 is above herd's limit of 1,024"),
    ({"hidden_size": 65536 * 2}, "hidden_size=131072 is above herd's limit of 65,536"),
    ({"vocab_size": 4_194_305}, "vocab_size=4194305 is above herd's limit of 4,194,304"),
    ({"num_attention_heads": 2048}, "num_attention_heads=2048 is above herd's limit"),
    ({"num_key_value_heads": 2048}, "num_key_value_heads=2048 is above herd's limit"),
    ({"intermediate_size": 1_048_577}, "intermediate_size=1048577 is above herd's limit"),
    ({"head_dim": 1 << 20}, "head_dim=1048576 is above herd's limit"),
]


@pytest.mark.parametrize(("change", "message"), REFUSED, ids=[str(c) for c, _ in REFUSED])
def test_what_the_backbone_cannot_represent_is_refused_in_one_line_naming_the_key(change, message):
    with pytest.raises(hf.CheckpointError, match=message) as refused:
        hf.config_from_hf(llama_json(**change), "model/config.json")
    assert str(refused.value).startswith("model/config.json") and "\n" not in str(refused.value)


def test_a_config_json_that_is_not_an_object_is_refused():
    with pytest.raises(hf.CheckpointError, match="must hold a JSON object"):
        hf.config_from_hf([llama_json()])


def test_a_million_layers_are_refused_before_anything_is_built(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(llama_json(num_hidden_layers=1_000_000)))
    start = time.perf_counter()
    with pytest.raises(hf.CheckpointError, match="num_hidden_layers=1000000 is above herd's limit"):
        hf.load(tmp_path)
    assert time.perf_counter() - start < 0.5
